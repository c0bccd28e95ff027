"""Training throughput of the small encoders on 32x32 inputs: where a CPU epoch's time goes.

    python -m mmbalance.bench.perf.train_speed [--samples 2048] [--threads 2] [--json out.json]

A synthetic `manifest` cache of two 32x32 modalities (an RGB image, stored as uint8 frames, and a
32x32 spectrogram, stored float16) is written once; then, for each encoder setting, joint
training runs through the harness exactly as `mmbalance run` does (bench.train.Trainer: the
cache's views, the loader, the method's step) and three numbers are taken:

* epoch: samples/s of a whole training epoch (the `train.samples_per_s` of metrics.jsonl), the
  second of two (the first pays for lazy imports and allocator warm-up);
* loader: samples/s of one pass of the training loader alone (views, collation, no model);
* step: samples/s of the method's training step on one batch already in memory (no loader).

Rates are best-of-`rounds` (other work on a shared machine only ever adds time). The issue's
target: >= 1,000 samples/s for the epoch on 2 cores. Data paths: the CPU default (the views'
batch halves on the batch, bench.data.augment_on_device), the per-sample views, and the batch
path fed by one loader worker. The default is the thread policy's one thread per run on CPU
(bench.threads); on a machine whose cores other processes keep busy, `--threads 2` shows what
torch's two spinning OpenMP threads per process cost: several times what one thread does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate

from mmbalance.bench.config import load_config
from mmbalance.bench.data import epoch_generator
from mmbalance.bench.store import RunDir
from mmbalance.bench.train import Trainer
from mmbalance.datasets.cache import ArraySpec, CacheMeta, CacheWriter
from mmbalance.datasets.manifest import PIPELINES

SIDE = 32
CLASSES = 4
TARGET = 1000.0  # samples/s of a training epoch on 2 cores (issue 15)
# (label, encoder section): the suite's small encoders, and small_cnn as it was before issue 15
ENCODERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("small_cnn", {"name": "small_cnn"}),
    ("small_cnn stem_stride=1 (before)", {"name": "small_cnn", "stem_stride": 1}),
    ("mlp", {"name": "mlp"}),
)


def write_cache(root: Path, n: int) -> Path:
    """A complete `manifest` cache of `n` train rows (and a few val/test rows): `image` (1, 32, 32,
    3) uint8 frames and `audio` (32, 32) float16, class-dependent so that the loss moves."""
    rng = np.random.default_rng(0)
    pipe = PIPELINES["small"]
    specs = {"audio": ArraySpec((SIDE, SIDE), "float16"), "image": ArraySpec((1, SIDE, SIDE, 3), "uint8", frames=True)}
    labels = [i % CLASSES for i in range(n)]
    meta = CacheMeta(dataset="manifest", pipeline="small", pipeline_params=pipe.model_dump(),
                     classes=[str(c) for c in range(CLASSES)],
                     arrays={m: s.to_dict() for m, s in specs.items()}, kinds={"audio": "audio", "image": "image"},
                     ids=[f"s{i}" for i in range(n)], labels=labels,
                     splits={"train": list(range(n)), "val": list(range(8)), "test": list(range(8))})
    writer = CacheWriter(root, meta)
    for row, y in enumerate(labels):
        image = rng.integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8) // 2 + 32 * y
        audio = rng.standard_normal((SIDE, SIDE)).astype(np.float16) + y
        writer.write(row, {"audio": audio, "image": image.astype(np.uint8)})
    writer.finish({}, {})
    return root


def trainer_for(cache: Path, encoder: dict[str, Any], run_dir: Path, batch_size: int,
                overrides: Sequence[str]) -> Trainer:
    base = {"dataset": {"name": "manifest", "root": str(cache), "pipeline": "small", "frame_size": SIDE},
            "model": {"encoders": {"audio": encoder, "image": encoder}},
            "method": {"name": "joint"}, "optim": {"lr": 0.01},
            "train": {"batch_size": batch_size, "epochs": 2, "progress": False, "device": "cpu"}}
    return Trainer(load_config(None, overrides, base=base), RunDir(run_dir))


def best_rate(samples: int, run, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return samples / best


def measure(trainer: Trainer, rounds: int) -> dict[str, float]:
    loader = trainer.loaders["train"]
    n = len(loader.split)
    epoch = max(trainer.train_epoch(e)["samples_per_s"] for e in range(rounds + 1))  # +1: the first warms up
    loader_rate = best_rate(n, lambda: [None for _ in loader(epoch_generator(0, 0))], rounds)
    batch = next(iter(loader(epoch_generator(0, 0))))
    steps = 10
    def train_steps() -> list:
        return [trainer.method.training_step(batch) for _ in range(steps)]

    step_rate = best_rate(steps * len(batch), train_steps, rounds)
    return {"epoch_samples_per_s": epoch, "loader_samples_per_s": loader_rate, "step_samples_per_s": step_rate}


def run(samples: int, threads: int | None, rounds: int, batch_size: int,
        settings: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, Any]]:
    """One row per (encoder, setting): the three rates, with the torch thread count used (the
    thread policy's, bench.threads, unless `threads` sets train.threads)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmb-train-speed-") as tmp:
        cache = write_cache(Path(tmp) / "cache", samples)
        for label, encoder in ENCODERS:
            for setting, overrides in settings:
                trainer = trainer_for(cache, encoder, Path(tmp) / "run", batch_size,
                                      [*overrides, *([f"train.threads={threads}"] if threads else [])])
                rows.append({"encoder": label, "setting": setting, "threads": torch.get_num_threads(),
                             **measure(trainer, rounds)})
    return rows


SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("augment per batch (CPU default)", ()),
    ("augment per sample", ("train.augment=loader",)),
    ("augment per batch, 1 loader worker", ("train.augment=device", "train.workers=1")),
)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    table = [[r["encoder"], r["setting"], r["threads"], f"{r['epoch_samples_per_s']:.0f}",
              "yes" if r["epoch_samples_per_s"] >= TARGET else "NO",
              f"{r['loader_samples_per_s']:.0f}", f"{r['step_samples_per_s']:.0f}"] for r in rows]
    return tabulate(table, headers=["encoder", "data path", "threads", "epoch samples/s", f">= {TARGET:.0f}",
                                    "loader only", "step only"], tablefmt="github")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmbalance.bench.perf.train_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2048, help="training rows of the synthetic cache")
    p.add_argument("--threads", type=int, default=None, help="train.threads (default: the thread policy's)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions; the fastest is taken")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = run(args.samples, args.threads, args.rounds, args.batch_size, SETTINGS)
    print(f"joint training, two {SIDE}x{SIDE} modalities (RGB image + spectrogram), batch {args.batch_size}, "
          f"{args.samples} samples, CPU\n")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
