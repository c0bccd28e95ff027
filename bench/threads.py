"""The suite's one thread policy: how many intra-op threads torch uses in a process that trains
a run. Every way of starting runs reaches it through bench.train.Trainer (`mmbalance run`,
`quickstart` and inline sweeps in this process; `local` workers and SLURM tasks in a `run-one`
process each), and the local launcher sizes its workers by it.

`train.threads` (a number, or `auto`, the default) decides:

- a number: that many threads, whatever the device;
- `auto` on CPU: one thread per run (CPU_THREADS); runs in parallel (the local launcher's
  workers, one per core) use the other cores. Measured on this project's shared 2-core machine
  (README, "Threads"; bench/perf/thread_speed.py, epochs in interleaved rounds): the
  quickstart's MLPs train slower with 2 threads even at their fastest (0.051 against 0.025 s per
  epoch), 4.8x slower in the median, at 4.9x the CPU time; ResNet18 gains 1.6x at its fastest
  (an idle second core) but is 2.2x slower in the median, at 2.7x the CPU time;
- `auto` on an accelerator: the share of the cores this process was given (a launcher's
  OMP_NUM_THREADS: cores / workers locally, cpus_per_task / K on SLURM), else the cores it may
  run on, at most CUDA_THREADS: the model runs on the device, and the loader's workers are
  processes of their own.
"""

from __future__ import annotations

import os

CPU_THREADS = 1
CUDA_THREADS = 8  # the most an accelerator run's own process uses by default (its loader workers are apart)


def is_thread_setting(value: object) -> bool:
    """What `train.threads` (and `mmbalance bench --threads`) accept: 'auto' or a whole number >= 1."""
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


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
