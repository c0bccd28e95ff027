"""One exclusive claim per run: the process that trains a run holds an OS file lock on the run
directory's `claim.lock` for as long as it trains it, so that two launchers (two terminals, a
retry script, a SLURM array and a local rerun) never train one run at once.

The lock is `fcntl.flock`, which belongs to the open file description: it is released when the
holder closes the file or dies (kill -9 included), and two opens in one process conflict as two
processes do. Whether a run is being trained is decided by trying the lock, never by a recorded
pid (pids wrap within hours); the holder's host, pid and process start time are written into the
lock file for display only. On NFS, Linux emulates flock with whole-file fcntl locks (which need
the lock manager); on Lustre it needs the `flock` mount option (`localflock` locks per node only).
Where the filesystem has no locks at all, a claim refuses with one line naming the mount (see
README, "Results store"): training without the claim could run one run twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from mmbalance.bench.store import RunDir
from mmbalance.core.errors import StoreError

CLAIM_FILE = "claim.lock"
# a claim attempt waits this long before it gives up: status probes and a launcher marking the
# run pending hold the lock for milliseconds, a training process for the whole run
PATIENCE_S = 1.0
# files only the claim holder writes: their temp files (atomic_write's `.<name>.*.tmp`) are
# leftovers of a killed holder; status.json and config.yaml are written by launchers too, without
# the claim, so their temp files count as leftovers only once they are this old
OWNED = ("metrics.jsonl", "summary.json", "checkpoint.pt", "best.pt", "best.pt.next")
STALE_TEMP_S = 60.0
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class Claim:
    """A held claim on one run directory; released by `release()` or at the end of a `with`."""

    def __init__(self, run_dir: RunDir, fd: int) -> None:
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.ftruncate(fd, 0)  # the holder record describes a holder only while there is one
        finally:
            os.close(fd)  # closing the last descriptor of the open file releases the lock

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_path(run_dir: RunDir) -> Path:
    return run_dir.path / CLAIM_FILE


def try_claim(run_dir: RunDir, patience_s: float | None = None) -> Claim | None:
    """Take the run's claim, or None when another process (or another open in this one) still
    holds it after `patience_s` (default PATIENCE_S). Once taken: the holder is recorded and
    the run's leftover temp files are removed."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(claim_path(run_dir), os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + (PATIENCE_S if patience_s is None else patience_s)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
        except OSError as e:
            os.close(fd)
            if e.errno in NO_LOCKS:
                raise no_locks(run_dir, e) from e
            raise
    claim = Claim(run_dir, fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(this_process()) + "\n").encode(), 0)
        remove_leftovers(run_dir)
    except BaseException:
        claim.release()
        raise
    return claim


def is_held(run_dir: RunDir) -> bool:
    """Whether some process holds the run's claim: a shared lock is tried and released at once
    (it conflicts with the holder's exclusive one). Opens read-only and creates nothing, so that
    reading a store never writes to it."""
    try:
        fd = os.open(claim_path(run_dir), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in NO_LOCKS:
            raise no_locks(run_dir, e) from e
        raise
    finally:
        os.close(fd)  # releases the probe's lock, if it got one
    return False


def holder(run_dir: RunDir) -> dict[str, Any] | None:
    """The holder record (host, pid, start, since) of the run's claim, as far as it can be read."""
    try:
        record = json.loads(claim_path(run_dir).read_text())
    except (OSError, ValueError):  # no claim yet, or a holder caught writing its record
        return None
    return record if isinstance(record, dict) else None


def describe_holder(run_dir: RunDir) -> str:
    """'by pid 123 on host h since 2024-...' (the holder's record), for the one-line messages."""
    record = holder(run_dir)
    if not record:
        return "by another process"
    return f"by pid {record.get('pid')} on host {record.get('host')} since {record.get('since')}"


def elsewhere_line(run_dir: RunDir) -> str:
    return f"being trained elsewhere ({describe_holder(run_dir)}): left alone"


def no_locks(run_dir: RunDir, error: OSError) -> StoreError:
    return StoreError(f"{run_dir.path}: the filesystem at {mount_of(run_dir.path)} does not support file locks "
                      f"({os.strerror(error.errno)}), which the run claims need (one trainer per run); put the "
                      "results store on a filesystem with locks (see README, 'Results store')")


def mount_of(path: Path) -> str:
    """'<mount point> (<fs type>)' of the longest mount containing `path`, from /proc/self/mounts."""
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return str(path)
    mounts = [(f[1].replace("\\040", " "), f[2]) for f in (line.split() for line in lines) if len(f) >= 3]
    inside = [(point, kind) for point, kind in mounts
              if target == point or target.startswith(point.rstrip("/") + "/")]
    if not inside:
        return str(path)
    point, kind = max(inside, key=lambda m: len(m[0]))
    return f"{point} ({kind})"


# ---- processes: who holds a claim, who marked a run pending


def this_process() -> dict[str, Any]:
    """Host, pid and start time of this process: what identifies it even after its pid is reused."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot: /proc/<pid>/stat field 22), or None
    where it is gone or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count from after it
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_gone(record: dict[str, Any]) -> bool:
    """Whether the process `record` (this_process() as written then) has ended: on this host,
    its pid is free or now names a process that started at another time. A process on another
    host cannot be looked at: never called gone."""
    if record.get("host") != socket.gethostname() or not record.get("pid"):
        return False
    if not Path("/proc").is_dir():  # no start times to compare: the pid is all there is
        return not pid_exists(int(record["pid"]))
    now = start_time(int(record["pid"]))
    return now is None or (record.get("start") is not None and now != record["start"])


def is_this(record: dict[str, Any]) -> bool:
    """Whether `record` (this_process() as written then) is this very process."""
    return record.get("host") == socket.gethostname() and record.get("pid") == os.getpid() \
        and record.get("start") == start_time(os.getpid())


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(run_dir: RunDir) -> list[Path]:
    """Remove the temp files a killed writer left in the run directory (see OWNED); returns them."""
    removed = []
    now = time.time()
    for tmp in run_dir.path.glob(".*.tmp"):
        name = tmp.name[1:].rsplit(".", 2)[0]  # `.<name>.<random>.tmp`
        try:
            if name in OWNED or now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    return removed
