"""What torch's intra-op threads do to a run's epoch: the measurement behind the thread policy
(bench.threads).

    python -m mmbalance.bench.perf.thread_speed [--threads 1,2] [--epochs 4] [--rounds 4] [--config X] [--cell C]

The run (default: the quickstart's joint-concat cell, probes off) is trained by the real trainer
on CPU once per thread count per round, the thread counts taking turns within each round (so that
a busy spell of a shared machine spreads over all of them). Every epoch but a run's first (which
pays for warm-up) is timed: wall seconds and this process's CPU seconds (all its threads), for
training and evaluation. The table gives the median per epoch and each count's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbalance.bench.config import RunConfig


def time_epochs(cfg: RunConfig, run_dir: Path) -> list[tuple[float, float]]:
    """(wall s, CPU s) of each epoch of `cfg` after its first: training and evaluation."""
    from mmbalance.bench.store import RunDir
    from mmbalance.bench.train import Trainer

    trainer = Trainer(cfg, RunDir(run_dir))
    times = []
    for epoch in range(cfg.train.epochs):
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch(epoch)
        trainer.evaluate("val")
        if epoch > 0:
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def measure_threads(threads: Sequence[int], cfg: RunConfig, rounds: int) -> list[dict[str, Any]]:
    """One row per thread count: median wall and CPU seconds per epoch over every round."""
    timed: dict[int, list[tuple[float, float]]] = {t: [] for t in threads}
    with tempfile.TemporaryDirectory(prefix="mmb-threads-") as tmp:
        for r in range(rounds):
            for t in threads:
                run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": t, "device": "cpu"})})
                timed[t] += time_epochs(run, Path(tmp) / f"r{r}-t{t}")
    rows = []
    for t in threads:
        wall = statistics.median(w for w, _ in timed[t])
        cpu = statistics.median(c for _, c in timed[t])
        rows.append({"threads": t, "epochs timed": len(timed[t]), "wall s/epoch": wall, "CPU s/epoch": cpu,
                     "wall min..max": f"{min(w for w, _ in timed[t]):.3f}..{max(w for w, _ in timed[t]):.3f}"})
    for row in rows:
        row["wall vs first"] = row["wall s/epoch"] / rows[0]["wall s/epoch"]
        row["CPU vs first"] = row["CPU s/epoch"] / rows[0]["CPU s/epoch"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from tabulate import tabulate

    from mmbalance.bench.perf.packing import load_measured_config

    parser = argparse.ArgumentParser(prog="python -m mmbalance.bench.perf.thread_speed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, the first untimed (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="runs per thread count, taking turns (default 4)")
    parser.add_argument("--config", default=None, help="run config or sweep file (default: the quickstart)")
    parser.add_argument("--cell", default=None, help="the sweep file's cell (default: joint-concat / the first)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=128")
    args = parser.parse_args(argv)
    cfg = load_measured_config(Path(args.config) if args.config else None,
                               [f"train.epochs={args.epochs}", *args.overrides], args.cell)
    rows = measure_threads([int(t) for t in args.threads.split(",")], cfg, args.rounds)
    print(f"{cfg.label or cfg.method['name']}: wall and CPU seconds per epoch (training and validation), "
          f"median of {args.rounds} interleaved round(s) x {args.epochs - 1} timed epoch(s), CPU\n")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
