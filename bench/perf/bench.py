"""`mmbalance bench`: step cost per method, loader speed, the data path and packing, in one run.

Everything is measured in this process (packing: in K child processes) and returned as tables of
ratios, with the targets they are held to, which the command prints; `--json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

# torch and the measuring modules are imported when the command runs: `mmbalance --help` stays fast
SHAPE_NAMES = ("cremad", "cpu", "quick")  # bench.perf.steps.SHAPES
SECTIONS = ("steps", "loader", "packing")
DATA_PATH_TARGET = 1.10  # step with real loading vs on-device data, on a GPU

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (the test suite's run)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all; loader includes "
                        "the data-path check, packing needs --packing)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--shapes", choices=SHAPE_NAMES, default=None,
                   help="input sizes: cremad (full CREMA-D; default on a GPU), cpu (half size, batch 64; "
                        "default on CPU), quick")
    p.add_argument("--methods", default=None, help="comma-separated methods to time besides joint (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (the fastest is taken)")
    p.add_argument("--steps", type=int, default=None, help="steps per method per round")
    p.add_argument("--clips", type=int, default=None, help="synthetic clips for the loader measurement")
    p.add_argument("--data-path", choices=("auto", "on", "off"), default="auto",
                   help="the step-with-loading check (auto: on a GPU only)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers of the data-path check (default: min(8, cores))")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoders (train.compile) for the step timing")
    p.add_argument("--packing", default=None, help="also measure K runs sharing the device, e.g. 1,2,4")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads for the step timing: auto (the runs' policy, train.threads) or N")
    p.add_argument("--json", default=None, help="write every number to this file")


def sections(args: argparse.Namespace) -> Iterator[str]:
    """The command's output, a heading or a table at a time, each as soon as it is measured."""
    from mmbalance.bench.device import resolve_device
    from mmbalance.bench.perf.steps import SHAPES, measure_steps, variants_named
    from mmbalance.bench.threads import apply_threads

    only = chosen_sections(args.only)
    device = resolve_device(args.device)
    shapes = SHAPES[args.shapes or ("quick" if args.quick else "cremad" if device.type == "cuda" else "cpu")]
    slow = device.type == "cpu"  # seconds per step: fewer repetitions
    # a CPU step's time varies by +-20% from round to round here: more rounds for its fastest
    rounds = args.rounds or (1 if args.quick else 8 if slow else 5)
    steps = args.steps or (1 if args.quick or slow else 3)
    clips = args.clips or (8 if args.quick else 128)
    # the steps are timed with the threads a run of the suite would use (bench.threads)
    threads, why = apply_threads(parse_threads(args.threads), device.type)
    yield f"mmbalance bench on {describe(device)}; {shapes.name}{'; encoders compiled' if args.compile else ''}"
    yield f"thread policy: {threads} intra-op thread(s) per run ({why})"
    results: dict[str, Any] = {"device": describe(device), "shapes": shapes.name,
                               "threads": {"per_run": threads, "why": why}}

    if "steps" in only:
        from mmbalance.bench.config import TrainConfig

        variants = variants_named(split_list(args.methods))
        rows = measure_steps(shapes, device, variants=variants, rounds=rounds, steps=steps,
                             warmup=1 if args.quick else 2, train=TrainConfig(compile=args.compile),
                             progress=lambda msg: log.info(f"timing steps: {msg}"))
        results["steps"] = rows
        yield (f"\n## Training step, same encoders and batch (fastest of {rounds} interleaved rounds of "
               f"{steps} step(s))\n")
        yield format_steps(rows)

    if "loader" in only:
        with tempfile.TemporaryDirectory(prefix="mmb-bench-") as tmp:
            from mmbalance.bench.perf.loader import measure_data_path, measure_loaders, setup_loader_data

            data = setup_loader_data(Path(tmp), clips)
            log.info(f"timing loaders: {rounds} interleaved round(s) over {clips} clips")
            loaders = measure_loaders(data, min(16, clips), device, rounds)
            results["loaders"] = loaders
            yield (f"\n## Loader, {clips} synthetic CREMA-D clips (ogmge: audio 1x257x188, 1 frame 224x224), "
                   f"one core, fastest of {rounds} interleaved round(s)\n")
            yield format_loaders(loaders)
            if args.data_path == "on" or (args.data_path == "auto" and device.type == "cuda"):
                workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
                batch = min(shapes.batch, clips)
                timed_steps = 3 if args.quick else max(steps * rounds, 30)
                check = measure_data_path(data, batch, device, steps=timed_steps, workers=workers,
                                          encoder=shapes.encoder)
                results["data_path"] = check
                yield "\n## Data path: joint step fed by the loader vs on data already on the device\n"
                yield format_data_path(check, device)

    if args.packing and "packing" in only:
        from mmbalance.bench.perf.packing import format_packing, measure_packing

        ks = [int(k) for k in split_list(args.packing) or []]
        yield f"\n## Packing: K runs of the quickstart's joint-concat cell (100 epochs) sharing this {device.type}\n"
        # 100 epochs and 3 interleaved repeats: start-up and noise would swamp shorter runs
        packing = measure_packing(ks, overrides=["train.epochs=100"], repeats=1 if args.quick else 3)
        results["packing"] = packing
        yield format_packing(packing)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        log.info(f"numbers written to {args.json}")


def chosen_sections(text: str | None) -> tuple[str, ...]:
    """--only's sections (all by default); an unknown one is refused with the allowed ones."""
    names = split_list(text) or list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        from mmbalance.core.errors import ConfigError

        raise ConfigError(f"bench --only: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    return tuple(names)


def parse_threads(text: str) -> int | str:
    """--threads: 'auto' or a whole number >= 1."""
    from mmbalance.bench.threads import is_thread_setting
    from mmbalance.core.errors import ConfigError

    value = int(text) if text.isdigit() else text
    if not is_thread_setting(value):
        raise ConfigError(f"--threads must be 'auto' or a whole number >= 1, got {text!r}")
    return value


def split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def describe(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def verdict(value: float, target: float | None) -> str:
    if target is None or not math.isfinite(value):
        return ""
    return f"<= {target:.2f} {'yes' if value <= target else 'NO'}"


def format_steps(rows: Sequence[dict[str, Any]]) -> str:
    table = [[r["method"], f"{r['step_s'] * 1000:.1f}", f"{r['ratio_to_joint']:.3f}",
              verdict(r["ratio_to_joint"], r["target"]), f"{r['samples_per_s']:.1f}", f"{r['peak_mb']:.0f}",
              f"{r['forward_passes_per_step']:.2f}", f"{r['backward_passes_per_step']:.2f}", f"+{r['spread']:.0%}"]
             for r in rows]
    return tabulate(table, headers=["method", "step ms", "vs joint", "target", "samples/s", "peak MB",
                                    "fwd/step", "bwd/step", "median round"], tablefmt="github")


def format_loaders(rows: Sequence[dict[str, Any]]) -> str:
    """The loader table: each path's rate and its ratio to the reference (or the line saying how
    to install it) and to the decode path, then each target's verdict against the reference."""
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}x"

    table = [[r["path"], r.get("note") or f"{r['samples_per_s_per_core']:.1f}", ratio(r["vs_reference"]),
              ratio(r["vs_decode"])] for r in rows]
    text = tabulate(table, headers=["path", "samples/s/core", "vs reference", "vs decode"], tablefmt="github")
    for r in rows:
        if r["target"] is None:
            continue
        if r["vs_reference"] is None:
            check = "not checked, no reference (librosa not installed)"
        else:
            check = f"{r['vs_reference']:.1f}x {'yes' if r['vs_reference'] >= r['target'] else 'NO'}"
        text += f"\ntarget: {r['path'].strip()} >= {r['target']:.0f}x the reference per core: {check}"
    return text


def format_data_path(check: dict[str, Any], device: Any) -> str:
    line = (f"batch {check['batch']}, {check['workers']} workers, {check['batches_per_pass']} batches per pass: "
            f"{check['loaded_step_s'] * 1000:.1f} ms/step "
            f"loaded vs {check['resident_step_s'] * 1000:.1f} ms on-device = {check['loaded_vs_resident']:.3f}")
    if device.type == "cuda":
        line += f" ({verdict(check['loaded_vs_resident'], DATA_PATH_TARGET)})"
    else:
        line += " (the target is for a GPU; here the loader shares the cores with the model)"
    return line
