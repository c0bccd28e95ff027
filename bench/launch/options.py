"""The `launcher:` section of a sweep file (and the `mmbalance sweep` flags that override it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bench.config import Strict


class LauncherConfig(Strict):
    """Where and how a sweep's runs are executed.

    inline: one after another in this process; local: `workers` processes on this machine;
    slurm: one submitit job array, with the sbatch options below.
    """

    name: Literal["inline", "local", "slurm"] = "inline"
    workers: int | None = Field(None, ge=1)  # local: processes (default: GPUs here, else 1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(240, ge=1)  # per run; a run that times out requeues itself and resumes
    gpus_per_task: int | None = Field(None, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(64, ge=1)
    constraint: str | None = None
    max_requeues: int = Field(10, ge=0)  # time-outs/pre-emptions after which a run is left failed
    sbatch_extra: dict[str, Any] = Field(default_factory=dict)  # any other sbatch option: {key: value}


# `mmbalance sweep` flags (dest name) that override the file's launcher section
FLAG_KEYS = ("workers", "partition", "account", "qos", "time_min", "gpus_per_task", "cpus_per_task",
             "mem_gb", "array_parallelism", "constraint")
