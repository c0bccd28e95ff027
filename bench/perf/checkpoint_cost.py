"""What writing checkpoints costs a run: the measurement behind `train.checkpoint_every`'s default.

    python -m mmbalance.bench.perf.checkpoint_cost [--every 1,auto] [--epochs 4] [--rounds 2] [--config X]

The run (default: configs/avdigits_resnet18.yaml, probes off; or a sweep file's cell) is trained
by the real trainer (bench.train.Trainer.fit) into a fresh run directory under `--dir` (default:
a temporary directory; give one on the disk the results go to) once per `checkpoint_every`
setting per round, the settings taking turns. Per setting, the median round: seconds per epoch
(training, evaluation, records and checkpoints), the training loop's alone, the checkpoints
written (checkpoint.pt, with best.pt when the best changed), the seconds they took (summary.json's
cost) and their share of the epochs' time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmbalance.bench.config import RunConfig

DEFAULT_CONFIG = "avdigits_resnet18.yaml"


def measure_checkpoints(settings: Sequence[str], cfg: RunConfig, rounds: int, where: Path | None = None
                        ) -> list[dict[str, Any]]:
    """One row per `checkpoint_every` setting: the median round by checkpoint share."""
    from mmbalance.bench.store import RunDir
    from mmbalance.bench.train import Trainer

    measured: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="mmb-checkpoints-", dir=where) as tmp:
        for r in range(rounds):
            for every in settings:
                value: int | str = int(every) if every.isdigit() else every
                one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": value})})
                trainer = Trainer(one, RunDir(Path(tmp) / f"r{r}-{every}"))
                start = time.perf_counter()
                cost = trainer.fit()["cost"]
                wall = time.perf_counter() - start
                measured[every].append({"checkpoint_every": every, "epochs": cfg.train.epochs,
                                        "epoch s": wall / cfg.train.epochs, "train s/epoch": cost["seconds_per_epoch"],
                                        "checkpoints": cost["checkpoints"], "checkpoint s": cost["checkpoint_s"],
                                        "share": cost["checkpoint_s"] / wall})
    return [sorted(rows, key=lambda row: row["share"])[(len(rows) - 1) // 2] for rows in measured.values()]


def main(argv: Sequence[str] | None = None) -> int:
    from tabulate import tabulate

    from mmbalance.bench.perf.packing import load_measured_config
    from mmbalance.bench.resources import config_path

    parser = argparse.ArgumentParser(prog="python -m mmbalance.bench.perf.checkpoint_cost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--every", default="1,auto", help="checkpoint_every settings, comma-separated (default 1,auto)")
    parser.add_argument("--epochs", type=int, default=4, help="train.epochs (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per setting, taking turns (default 2)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config or sweep file (default {DEFAULT_CONFIG})")
    parser.add_argument("--cell", default=None, help="the sweep file's cell (default: its first run)")
    parser.add_argument("--dir", default=None, help="where the runs are written (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.device=cpu")
    args = parser.parse_args(argv)
    cfg = load_measured_config(config_path(args.config), [f"train.epochs={args.epochs}", *args.overrides], args.cell)
    rows = measure_checkpoints(args.every.split(","), cfg, args.rounds, Path(args.dir) if args.dir else None)
    print(f"{args.config} ({cfg.method['name']}), {args.epochs} epochs, device {cfg.train.device}: "
          f"median of {args.rounds} interleaved round(s)\n")
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
