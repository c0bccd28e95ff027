"""A full disk (and other OS errors) while runs write to the store: the run ends `failed` with the
OS's own message naming the file, nothing half-written remains, and the local launcher starts no
more runs, lists those it did not start (their statuses as they were) and exits non-zero without
a traceback. On a real small tmpfs where the test may mount one, everywhere else with the write
made to fail (in process) or a file-size limit (a real OS error in the launcher's processes)."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmbalance.bench import store as store_module
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.store import Store
from mmbalance.bench.sweep import load_sweep
from mmbalance.core.errors import RunFailed, StoreError
from mmbalance.datasets.cache import Cache

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"

# hidden 1024: best.pt ~210 kB and checkpoint.pt ~430 kB, the other files of a run a few kB
SWEEP = """
group: full
base:
  dataset: {name: gaussian}
  model: {encoders: {audio: {hidden: 1024}, visual: {hidden: 1024}}}
  train: {epochs: 2, batch_size: 32, progress: false}
  optim: {lr: 0.05}
  eval: {probe_c_grid: [1.0]}
seeds: [0, 1, 2]
cells:
  joint: {method: {name: joint}}
launcher: {name: local, workers: 1}
"""


def leftovers(root: Path) -> list[Path]:
    """Temp files of interrupted atomic writes under `root`."""
    return sorted(root.rglob("*.tmp"))


class FillsUp:
    """A file object that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, ENOSPC)
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_fails_the_run_with_the_os_message_and_leaves_no_temp_file(fast_config, store, monkeypatch):
    real = store_module.atomic_write

    def disk_full_at_the_checkpoint(path, write, mode="w"):
        real(path, (lambda f: write(FillsUp(f, 1000))) if path.name == "checkpoint.pt" else write, mode)

    monkeypatch.setattr(store_module, "atomic_write", disk_full_at_the_checkpoint)
    cfg = fast_config()
    rd = store.run_dir(cfg.group, cfg.run_id())
    from mmbalance.bench.train import run

    with pytest.raises(RunFailed) as failed:
        run(cfg, store)
    status = rd.status()
    # not torch's "[enforce fail at inline_container.cc]" with the OS error only in its chain
    assert status["state"] == "failed" and status["error"] == f"{ENOSPC}: {rd.checkpoint}", status["error"]
    assert f"{ENOSPC}: {rd.checkpoint}" in str(failed.value)
    # each file whole or absent: the new best goes to best.pt.next before checkpoint.pt is written
    assert not rd.checkpoint.exists() and not rd.best.exists() and rd.load(rd.best_next)["epoch"] == 0
    assert leftovers(store.root) == []
    assert [r["epoch"] for r in rd.read_metrics()] == [0]

    monkeypatch.setattr(store_module, "atomic_write", real)  # space freed: the relaunch finishes the run
    assert run(cfg, store).state == "finished"


def test_the_failed_write_keeps_the_old_file_and_names_the_target(tmp_path):
    target = tmp_path / "status.json"
    store_module.atomic_write_text(target, "old")
    with pytest.raises(OSError) as error:
        store_module.atomic_write(target, lambda f: FillsUp(f, 2).write("new"))
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_a_full_disk_while_marking_runs_pending_puts_every_status_back(tmp_path, monkeypatch, logged):
    from mmbalance.bench.launch import local
    from mmbalance.bench.launch.plan import plan

    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    earlier = store.run_dir(configs[0].group, configs[0].run_id())
    earlier.set_status("interrupted", error="from an earlier launch")
    before = earlier.status_file.read_text()
    third = store.run_dir(configs[2].group, configs[2].run_id())
    real = store_module.RunDir.set_status

    def full_at_the_third(self, state, **info):
        if self.path == third.path:
            raise OSError(errno.ENOSPC, ENOSPC, str(self.status_file))
        real(self, state, **info)

    monkeypatch.setattr(store_module.RunDir, "set_status", full_at_the_third)
    with pytest.raises(StoreError, match=f"the launch stopped on an OS error: {ENOSPC}: {third.status_file}"):
        local.launch_local(plan(configs, store), LauncherConfig(name="local", workers=1))
    assert earlier.status_file.read_text() == before
    for c in configs[1:]:
        assert not store.run_dir(c.group, c.run_id()).status_file.exists()
    out = logged.read()
    assert "3 run(s) not started, left as they were" in out
    assert all(c.run_id() in out for c in configs)


def launch_sweep(root: Path, sweep: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`mmbalance sweep` in a subprocess (its run-one processes inherit any file-size limit)."""
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "mmbalance", "--results", str(root), "sweep", str(sweep)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def assert_stopped_after_the_first_run(done: subprocess.CompletedProcess, store: Store, sweep: Path,
                                       message: str) -> None:
    """One worker: the first run failed with `message` (naming its checkpoint.pt), the launcher
    started neither of the other two, put their statuses back, listed them and exited 2."""
    _, configs = load_sweep(sweep)
    first, *others = [store.run_dir(c.group, c.run_id()) for c in configs]
    out, err = done.stdout, done.stderr
    assert done.returncode == 2, out + err
    assert "Traceback" not in out + err
    status = first.status()
    assert status["state"] == "failed" and status["error"] == f"{message}: {first.checkpoint}", status
    assert f"warning: [1/3] failed joint seed 0 {first.run_id} " in err  # the launch's progress: stderr
    assert "warning: stopped: " in err and "2 run(s) not started, left as they were:" in err
    assert all(f"joint seed {i} {rd.run_id}" in err for i, rd in enumerate(others, 1))
    assert err.strip().splitlines()[-1:] == [
        f"error: the launch stopped on an OS error: {message}: {first.checkpoint} (run {first.run_id}); fix that "
        "(free space on the results disk, say) and launch the sweep again (finished runs are skipped, started "
        "ones resume)"]
    for rd in others:
        assert rd.status() == {"state": "new"} and not (rd.path / "run.log").exists()
    assert leftovers(store.root) == []
    assert not first.checkpoint.exists()


def test_a_file_size_limit_stops_the_local_launcher_after_the_failed_run(tmp_path):
    """A real OS error in the launcher's processes without any mount: writes past RLIMIT_FSIZE
    fail with EFBIG ("File too large"), as writes to a full disk fail with ENOSPC."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    store = Store(tmp_path / "results")
    done = launch_sweep(store.root, sweep, limit_bytes=300_000)  # best.pt fits, checkpoint.pt does not
    print(done.stdout, done.stderr)
    assert_stopped_after_the_first_run(done, store, sweep, os.strerror(errno.EFBIG))


@pytest.fixture
def small_disk(tmp_path):
    """A 512 kB tmpfs (mounted here; skipped where this process may not mount one)."""
    where = tmp_path / "disk"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow  # ~27 s: two launches of 3 runs in worker processes; the file-size-limit test keeps
# the launcher's OS-error path in the default suite
def test_a_full_disk_stops_the_local_launcher_and_a_relaunch_with_space_finishes(small_disk, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    store = Store(small_disk / "results")
    done = launch_sweep(store.root, sweep)
    print(done.stdout, done.stderr)
    assert_stopped_after_the_first_run(done, store, sweep, ENOSPC)

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    again = launch_sweep(store.root, sweep)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 runs: 3 finished" in again.stderr



CACHE_ON_A_SMALL_DISK = """
import sys
from pathlib import Path
import numpy as np
from mmbalance.datasets.cache import ArraySpec, CacheMeta, CacheWriter
spec = ArraySpec((64, 1024), "float16")  # 128 kB a row: 8 rows do not fit a 512 kB disk
meta = CacheMeta(dataset="x", pipeline="p", pipeline_params={}, classes=["a"], arrays={"audio": spec.to_dict()},
                 ids=[f"s{i}" for i in range(8)], labels=[0] * 8, splits={"train": list(range(8))})
writer = CacheWriter(Path(sys.argv[1]), meta)
try:
    for row in writer.pending():
        writer.write(row, {"audio": np.full((64, 1024), row, np.float16)})
    writer.finish({}, {})
finally:
    writer.flush()  # as the prepare does: an error keeps every finished row
"""


def write_cache(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CACHE_ON_A_SMALL_DISK, str(where)], capture_output=True, text=True)


def test_a_cache_that_fills_the_disk_fails_with_the_os_message_keeps_its_rows_and_resumes(small_disk):
    # a sparse memory-mapped file on a full disk kills the process with SIGBUS at the row write;
    # each row's blocks reserved before it is written, the prepare fails with an OSError instead
    cache = small_disk / "cache"
    done = write_cache(cache)
    assert done.returncode == 1, (done.returncode, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    failed_row = int(re.search(r"\(row (\d+) of the audio array needs 131 kB, ", last).group(1))
    assert last.startswith(f"OSError: [Errno {errno.ENOSPC}] {ENOSPC} (row {failed_row} of the audio array"), last
    assert last.endswith(f"is free): '{cache / 'audio.npy'}'"), last
    assert 0 < failed_row < 8
    assert np.load(cache / "done.npy").tolist() == [True] * failed_row + [False] * (8 - failed_row)

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    again = write_cache(cache)
    assert again.returncode == 0, again.stderr
    finished = Cache(cache)
    assert finished.meta.complete
    assert [float(finished.arrays["audio"][r].mean()) for r in range(8)] == list(range(8))


def test_reserving_a_cache_row_names_the_file_the_row_its_size_and_the_free_space(tmp_path, monkeypatch):
    from mmbalance.bench.oserror import os_message
    from mmbalance.datasets import cache as cache_module

    path = tmp_path / "visual.npy"
    array = np.lib.format.open_memmap(path, "w+", np.uint8, (4, 1000, 3000))
    calls = []

    def full(fd, offset, length):
        calls.append((offset, length))
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(cache_module.os, "posix_fallocate", full)
    with pytest.raises(OSError) as error:
        cache_module.reserve_row(array, 2, "row 2 of the visual array")
    assert calls == [(array.offset + 2 * 3_000_000, 3_000_000)]
    assert error.value.errno == errno.ENOSPC
    message = os_message(error.value)
    assert message.startswith(f"{ENOSPC} (row 2 of the visual array needs 3.0 MB, ")
    assert message.endswith(f" is free): {path}")

    def unsupported(fd, offset, length):  # a file system that cannot reserve: the row is written as before
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(cache_module.os, "posix_fallocate", unsupported)
    cache_module.reserve_row(array, 2, "row 2 of the visual array")
