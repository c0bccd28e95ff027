"""The SLURM queue as seen through its command-line clients (squeue, scancel); no submitit.

Every function degrades to "nothing known" where the clients are not installed, so that status
and planning work on a machine without SLURM.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable


def have_slurm() -> bool:
    return shutil.which("squeue") is not None


def squeue() -> subprocess.CompletedProcess:
    """squeue's list of every job id it holds, array elements one by one; raises as subprocess.run."""
    return subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)


def queued_job_ids() -> set[str] | None:
    """Ids of every job SLURM still holds (pending or running), array elements one by one
    (`123_4`); None where squeue is missing or fails (nothing can be said)."""
    if not have_slurm():
        return None
    try:
        done = squeue()
    except (subprocess.SubprocessError, OSError):
        return None
    if done.returncode:
        return None
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def squeue_failure() -> str:
    """Why squeue gives no answer here, in its own words (for a note; queued_job_ids said None)."""
    if not have_slurm():
        return "squeue is not installed here"
    try:
        done = squeue()
    except subprocess.TimeoutExpired:
        return "squeue did not answer within 60 s"
    except OSError as e:
        return f"squeue could not be run: {e}"
    said = (done.stderr or done.stdout).strip().splitlines()
    return f"squeue failed: {said[-1]}" if said else f"squeue failed (exit status {done.returncode})"


def cancel_jobs(job_ids: Iterable[str]) -> str:
    """scancel the given jobs; returns what scancel said (empty when all went well)."""
    ids = sorted(set(job_ids))
    if not ids:
        return ""
    if shutil.which("scancel") is None:
        raise FileNotFoundError("scancel is not installed here; cancel from a machine of the cluster")
    done = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=120)
    return (done.stdout + done.stderr).strip()
