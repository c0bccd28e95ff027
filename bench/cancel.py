"""A cancelled run stays cancelled. `mmbalance cancel` records each run of the jobs it cancels as
`interrupted`, naming the job (`cancelled_job`), but SLURM lets a cancelled job run on through its
kill grace period, and the job's next status write would put `running` back. So every status
write takes a short lock (status_lock) and is refused, raising RunCancelled, when it comes from
the very job that was cancelled: the run stops at its next write (after the end of an epoch its
checkpoint is already saved, so launching again resumes it). Any other process (a relaunch, a new
job, a local run) writes as usual; the marker goes with the first record it writes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from pathlib import Path
from typing import Any

from mmbalance.core.errors import MMBalanceError, RunFailed

CANCELLED_JOB = "cancelled_job"  # status.json key: the job `mmbalance cancel` cancelled
STATUS_LOCK = ".status.lock"  # beside status.json; held only while one record is read and replaced


class RunCancelled(RunFailed):
    """The run's job was cancelled: it writes nothing more and stops."""


def own_job_id() -> str | None:
    """This process's SLURM job id as the launcher records it (`<array>_<task>` for an array task,
    as submitit names it); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def cancelled_here(status: dict[str, Any]) -> str | None:
    """The cancelled job's id when `status` records a cancel of this very process's job."""
    job = status.get(CANCELLED_JOB)
    if status.get("state") == "interrupted" and job and str(job) == own_job_id():
        return str(job)
    return None


def readable_status(run_dir: Any) -> dict[str, Any]:
    """The run's status record, or {} where it cannot be read: a damaged file records no cancel,
    and the write that replaces it must go through."""
    try:
        status = run_dir.status()
    except (ValueError, MMBalanceError):  # JSON or text decoding, or the store's own complaint
        return {}
    return status if isinstance(status, dict) else {}


@contextmanager
def status_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive flock on the run's STATUS_LOCK while the block runs, so that reading the status
    and replacing it is one step for every writer. Where no lock can be had (a filesystem without
    locks, a store this user cannot write) the block runs unlocked: the write itself then fails or
    goes through as before."""
    fd = None
    with suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / STATUS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fd is not None:
            with suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def guarded(set_status: Callable[..., None]) -> Callable[..., None]:
    """RunDir.set_status under the run's status lock, refused (RunCancelled) for a cancelled job's
    own writes; `finished` still goes through: such a run did finish."""
    @wraps(set_status)
    def write(run_dir: Any, state: str, **info: Any) -> None:
        with status_lock(run_dir.path):
            job = cancelled_here(readable_status(run_dir)) if state != "finished" else None
            if job:
                raise RunCancelled(f"run {run_dir.run_id} was cancelled (job {job}, mmbalance cancel): it stops "
                                   f"here, keeping its last checkpoint; launch again to resume it ({run_dir.path})")
            set_status(run_dir, state, **info)

    return write
