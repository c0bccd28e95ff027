"""The suite's one thread policy: how many intra-op threads torch uses in a process that trains
a run. Every way of starting runs reaches it through bench.train.Trainer (`mmbalance run`,
`quickstart` and inline sweeps in this process; `local` workers and SLURM tasks in a `run-one`
process each), and the local launcher sizes its workers by it.

`train.threads` (a number, or `auto`, the default) decides:

- a number: that many threads, whatever the device;
- `auto` on CPU: one thread per run (CPU_THREADS); runs in parallel (the local launcher's
  workers, one per core) use the other cores. Measured on this project's 2-core machine
  (README, "Threads"), epoch by epoch in interleaved rounds: the quickstart's MLPs train
  *slower* with 2 threads even on idle cores (0.030 against 0.021 s per epoch, 2.8x the CPU
  time), and on cores other processes keep busy torch's spinning OpenMP threads cost 10x the
  wall time; ResNet18 gains 1.7x from a second idle core but loses 3x on busy ones;
- `auto` on an accelerator: the share of the cores this process was given (a launcher's
  OMP_NUM_THREADS: cores / workers locally, cpus_per_task / K on SLURM), else the cores it may
  run on, at most CUDA_THREADS: the model runs on the device, and the loader's workers are
  processes of their own.
"""

from __future__ import annotations

import os

CPU_THREADS = 1
CUDA_THREADS = 8  # the most an accelerator run's own process uses by default (its loader workers are apart)


def cpu_share() -> int:
    """The cores this process may use: the OMP_NUM_THREADS a launcher gave it, else its CPU affinity."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_threads(setting: int | str, device_type: str, share: int | None = None) -> tuple[int, str]:
    """The intra-op threads of a run with `train.threads` = `setting` on a device of `device_type`
    ('cpu', 'cuda', ...), and why, in a few words. `share`: this process's cores (default cpu_share())."""
    if setting != "auto":
        return int(setting), "train.threads"
    if device_type == "cpu":
        return CPU_THREADS, "auto: 1 per run on CPU, parallel runs use the other cores; train.threads=N for more"
    share = share or cpu_share()
    return min(share, CUDA_THREADS), f"auto on {device_type}: this process's {share} core(s), at most {CUDA_THREADS}"


def apply_threads(setting: int | str, device_type: str) -> tuple[int, str]:
    """Set torch's intra-op threads by run_threads; returns what run_threads returned."""
    import torch

    threads, why = run_threads(setting, device_type)
    torch.set_num_threads(threads)
    return threads, why
