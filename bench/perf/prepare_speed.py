"""How fast `mmbalance prepare manifest` turns short wavs into a cache: clips per second per core.

    python -m mmbalance.bench.perf.prepare_speed [--clips 600] [--rate 8000] [--rounds 5]
        [--workers 1] [--set feature=logmel --set bins=64 ...]

Writes `--clips` one-second mono wavs (a tone plus noise, 16-bit PCM at `--rate` Hz, the case of
short low-rate speech recordings) and a manifest CSV naming them in a temporary folder, then
runs the whole manifest prepare (CSV check, plan, decode, resample, features, cache writes,
normalisation statistics) `--rounds` times into fresh cache folders, after one untimed round on
a few clips that pays the imports and builds the per-process resamplers. Per round it takes the CPU
time of this process and of its worker processes (RUSAGE_CHILDREN counts a pool's workers once
they have exited, which they have when prepare returns), so the rate per core does not depend on
what else the shared machine runs; the median round is reported, with the wall-clock rate beside
it. Without `--set` options the `small` pipeline runs as it is.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

TARGET = 200.0  # one-second clips per second per core, log-mel (issue 15)


def write_clips(root: Path, n: int, rate: int, seconds: float = 1.0) -> Path:
    """`n` one-second wavs in two classes under `root`, and the manifest CSV naming them."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    (root / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        wave = 0.3 * np.sin(2 * np.pi * (300 + 50 * (i % 7)) * t) + 0.05 * rng.standard_normal(len(t))
        soundfile.write(root / "wav" / f"c{i:05d}.wav", wave.astype(np.float32), rate, subtype="PCM_16")
        split = "test" if i % 10 == 0 else "val" if i % 10 == 1 else "train"
        rows.append([f"c{i:05d}", f"class{i % 2}", split, f"wav/c{i:05d}.wav"])
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "split", "audio"])
        writer.writerows(rows)
    return path


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def one_round(csv_path: Path, out: Path, workers: int, options: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one prepare into `out`."""
    from mmbalance.datasets.prepare.runner import prepare

    extra = {"options": options} if options else {}
    if "options" not in inspect.signature(prepare).parameters and options:
        raise SystemExit("this checkout's prepare takes no pipeline options; run without --set")
    cpu, wall = cpu_seconds(), time.perf_counter()
    report = prepare("manifest", csv_path, out, "small", workers=workers, progress=False, **extra)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    if report.processed == 0 or report.corrupt:
        raise SystemExit(f"prepare decoded {report.processed} clips, {len(report.corrupt)} corrupt")
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=600, help="one-second wavs to prepare (default: 600)")
    p.add_argument("--rate", type=int, default=8000, help="their sample rate in Hz (default: 8000)")
    p.add_argument("--rounds", type=int, default=5, help="prepare runs; the median is reported (default: 5)")
    p.add_argument("--workers", type=int, default=1, help="prepare's decoding processes (default: 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline option of the prepare, over the small pipeline (repeatable)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmb-prepare-speed-") as tmp:
        one_round(write_clips(Path(tmp) / "warm", 20, args.rate), Path(tmp) / "warm-cache", 1, args.set)
        csv_path = write_clips(Path(tmp) / "raw", args.clips, args.rate)
        rounds = [one_round(csv_path, Path(tmp) / f"cache{r}", args.workers, args.set) for r in range(args.rounds)]
    cpu = statistics.median(c for c, _ in rounds)
    wall = statistics.median(w for _, w in rounds)
    options = ", ".join(args.set) or "the small pipeline as it is"
    print(f"prepare manifest: {args.clips} one-second wavs at {args.rate} Hz, {args.workers} worker(s), {options}")
    print(f"  per core (CPU time, median of {args.rounds}): {args.clips / cpu:.0f} clips/s "
          f"(target for log-mel: >= {TARGET:.0f})")
    print(f"  wall clock (median): {args.clips / wall:.0f} clips/s")
    print("  rounds (cpu s / wall s): " + ", ".join(f"{c:.2f}/{w:.2f}" for c, w in rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
