"""How much K runs packed onto one device gain: K `python -m mmbalance run-one` processes train the
same config at once, with the threads (and GPU) split as the local launcher splits them, and
their aggregate throughput is compared with one run alone (K=1).

    python -m mmbalance.bench.perf.packing --ks 1,2,4 --epochs 8

Numbers come from the real trainer: each run's own epoch timing (summary.json's cost) and the
wall time of the whole group, process start-up and per-epoch evaluation included.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbalance.bench.config import RunConfig
from mmbalance.bench.resources import quickstart_config

QUICKSTART_CELL = "joint-concat"
# what the measurement leaves out by default: the probes after training (not throughput) and the bar
MEASURE_OVERRIDES = ("eval.probe=false", "train.progress=false")


def load_measured_config(config: Path | None, overrides: Sequence[str], cell: str | None = None) -> RunConfig:
    """The run to measure: `config` (a run config, or a sweep file's cell `cell`, default its first
    run) with `overrides`; without `config`, the quickstart's joint-concat cell."""
    from mmbalance.bench.config import load_config
    from mmbalance.bench.sweep import is_sweep_file, load_sweep
    from mmbalance.core.errors import ConfigError

    overrides = [*MEASURE_OVERRIDES, *overrides]
    if config is None:
        config, cell = quickstart_config(), cell or QUICKSTART_CELL
    if not is_sweep_file(config):
        return load_config(config, overrides)
    _, configs = load_sweep(config, overrides)
    chosen = [c for c in configs if cell is None or c.label == cell]
    if not chosen:
        cells = sorted({c.label for c in configs if c.label})
        raise ConfigError(f"{config} has no cell {cell!r}; its cells: {', '.join(cells)}")
    return chosen[0]


def measure_packing(ks: Sequence[int], config: Path | None = None, overrides: Sequence[str] = (), *,
                    cell: str | None = None, repeats: int = 1, workdir: Path | None = None) -> list[dict[str, Any]]:
    """For each K in `ks`: K processes train the config at once (seeds 0..K-1, so that their run
    ids differ; the work is the same) in a temporary store. One row per K (see measure_one); with
    `repeats` > 1 every K is measured that often, the Ks taking turns (so that a busy spell of the
    machine spreads over all of them), and the row is the repeat with the median aggregate."""
    from mmbalance.core.errors import ConfigError

    if not ks or any(k < 1 for k in ks) or repeats < 1:
        raise ConfigError(f"packing needs K values >= 1 and repeats >= 1, got {list(ks)} and {repeats}")
    cfg = load_measured_config(Path(config) if config else None, overrides, cell)
    measured: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory(prefix="mmb-packing-", dir=workdir) as tmp:
        for repeat in range(repeats):
            for k in ks:
                measured[k].append(measure_one(cfg, k, Path(tmp) / f"r{repeat}-k{k}"))
    rows = [median_row(measured[k]) for k in dict.fromkeys(ks)]
    base = next((r for r in rows if r["K"] == 1), None)
    for row in rows:
        row["speed-up vs K=1"] = row["aggregate samples/s"] / base["aggregate samples/s"] if base else math.nan
    return rows


def measure_one(cfg: RunConfig, k: int, root: Path) -> dict[str, Any]:
    """K runs of `cfg` at once; aggregate samples/s = all training samples of the K runs / wall
    seconds from starting the processes to the last one's end (start-up and evaluation included:
    what a sweep gets); per-run samples/s = the runs' own training-loop throughput, averaged."""
    from mmbalance.bench.launch.local import gpu_count, threads_per_worker, worker_env
    from mmbalance.bench.store import Store
    from mmbalance.bench.threads import run_threads
    from mmbalance.core.errors import RunFailed

    store, gpus = Store(root), gpu_count()
    dirs = []
    for seed in range(k):
        run = cfg.model_copy(update={"group": "packing", "train": cfg.train.model_copy(update={"seed": seed})})
        rd = store.run_dir(run.group, run.run_id())
        rd.write_config(run.to_dict())
        dirs.append(rd)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "mmbalance", "run-one", str(rd.path)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env(slot, k, gpus, k))
             for slot, rd in enumerate(dirs)]
    outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
    wall = time.perf_counter() - start
    for rd, proc, out in zip(dirs, procs, outputs):
        if proc.returncode != 0 or rd.read_summary() is None:
            raise RunFailed(f"packing K={k}: run {rd.run_id} exited with code {proc.returncode}:\n{out[-2000:]}")
    costs = [rd.read_summary()["cost"] for rd in dirs]
    samples = sum(r["train"]["samples_per_s"] * r["train"]["seconds"] for rd in dirs for r in rd.read_metrics())
    return {
        "K": k,
        "device": costs[0]["device"],
        "threads/run": run_threads(cfg.train.threads, costs[0]["device"].split(":")[0], threads_per_worker(k))[0],
        "epochs": cfg.train.epochs,
        "wall s": wall,
        "aggregate samples/s": samples / wall,
        "per-run samples/s": sum(c["samples_per_s"] for c in costs) / k,
        "train-loop aggregate samples/s": sum(c["samples_per_s"] for c in costs),
    }


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The measurement with the median aggregate samples/s (the lower middle one of an even count),
    with how many repeats there were and the spread of their aggregates."""
    ranked = sorted(rows, key=lambda r: r["aggregate samples/s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    if len(rows) > 1:
        row["repeats"] = len(rows)
        row["aggregate min..max"] = f"{ranked[0]['aggregate samples/s']:.0f}..{ranked[-1]['aggregate samples/s']:.0f}"
    return row


def format_packing(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of measure_packing's rows."""
    from tabulate import tabulate

    return tabulate([dict(r) for r in rows], headers="keys", tablefmt="github", floatfmt=".2f")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmbalance.bench.perf.packing", description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4", help="runs packed at once, comma-separated (default 1,2,4)")
    parser.add_argument("--config", default=None, help="run config or sweep file (default: the quickstart)")
    parser.add_argument("--cell", default=None,
                        help="the sweep file's cell to measure (default: joint-concat / the first)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every K this often; report the median (default 1)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=128")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    rows = measure_packing([int(k) for k in args.ks.split(",")], args.config, overrides, cell=args.cell,
                           repeats=args.repeats)
    print(format_packing(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
