"""The `launcher:` section of a sweep file (and the `mmbalance sweep` flags that override it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mmbalance.core.params import Strict

# What `runs_per_gpu` means when the sweep leaves it out. local: 2, the best K measured by
# `python -m mmbalance.bench.perf.packing --ks 1,2,4 --epochs 100 --repeats 3` (the quickstart's joint-concat
# run, AV-Digits with MLP encoders, probes off) on a 2-core machine WITHOUT a GPU (CPU only; not
# measured on a GPU): whole-run aggregate 7,879 samples/s for K=1 (2 threads), 13,413 for K=2
# (1.70x; 1 thread each), 13,107 for K=4 (1.66x; 4 processes on 2 cores, each run twice as
# slow). Small runs leave the device idle during start-up and evaluation, and two threads train
# an MLP only 1.2x faster than one. slurm: 1, one run per array task as before packing existed:
# a task's CPUs and GPUs are what the sweep asks for per task, so packing there is its choice.
DEFAULT_RUNS_PER_GPU = {"inline": 1, "local": 2, "slurm": 1}


class LauncherConfig(Strict):
    """Where and how a sweep's runs are executed.

    inline: one after another in this process; local: `workers` processes on this machine;
    slurm: one submitit job array, with the sbatch options below.
    runs_per_gpu (K): local and slurm run K runs at once on one GPU (K processes sharing it; on a
    machine without GPUs, K processes sharing the cores); left out, DEFAULT_RUNS_PER_GPU decides.
    """

    name: Literal["inline", "local", "slurm"] = "inline"
    workers: int | None = Field(None, ge=1)  # local: processes (default: GPUs here x runs_per_gpu, else runs_per_gpu)
    runs_per_gpu: int | None = Field(None, ge=1)  # K runs share one GPU; slurm: K runs per array task
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(240, ge=1)  # per array task; a task that times out requeues itself and resumes
    gpus_per_task: int | None = Field(None, ge=0)
    cpus_per_task: int = Field(1, ge=1)  # slurm: split between the runs_per_gpu runs of a task
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(64, ge=1)
    constraint: str | None = None
    max_requeues: int = Field(10, ge=0)  # time-outs/pre-emptions after which a run is left failed
    sbatch_extra: dict[str, Any] = Field(default_factory=dict)  # any other sbatch option: {key: value}

    def packing(self) -> int:
        """K, the runs that share one GPU (or, for slurm, one array task)."""
        return self.runs_per_gpu or DEFAULT_RUNS_PER_GPU[self.name]


# `mmbalance sweep` flags (dest name) that override the file's launcher section
FLAG_KEYS = ("workers", "runs_per_gpu", "partition", "account", "qos", "time_min", "gpus_per_task",
             "cpus_per_task", "mem_gb", "array_parallelism", "constraint")
