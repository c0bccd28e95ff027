"""One claim per run (bench.claim): two launchers at once train each run once; liveness by the
claim, not by a pid that may be reused; a claimed run is left alone; leftover temp files go;
pending runs of a dead launcher are shown stale."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from mmbalance.bench import claim
from mmbalance.bench import launch as launch_module
from mmbalance.bench.cli import main as cli
from mmbalance.bench.config import RunConfig
from mmbalance.bench.launch import launch, slurm
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import PlannedRun, plan
from mmbalance.bench.launch.worker import record_exit
from mmbalance.bench.status import status_table
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import Trainer, run
from mmbalance.core.errors import EXIT_ELSEWHERE
from tests.conftest import run_interrupted


def test_two_launchers_released_at_once_train_each_run_exactly_once(fast_config, store, monkeypatch, logged):
    """Two inline launchers on one store, released by a barrier: both plan "10 new"; the claims
    let each run be trained by one of them, the other leaves it alone."""
    configs = [fast_config(f"train.seed={seed}") for seed in range(10)]
    trained: list[str] = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *args: trained.append(self.dir.run_id) or fit(self, *args))
    barrier, planned = threading.Barrier(2), threading.Barrier(2, timeout=60)
    codes: list[int] = []
    real_plan = launch_module.plan

    def plan_then_wait(*args, **kwargs):  # neither trains before both have planned, however loaded the machine
        found = real_plan(*args, **kwargs)
        planned.wait()
        return found

    monkeypatch.setattr(launch_module, "plan", plan_then_wait)

    def launcher() -> None:
        barrier.wait()
        codes.append(launch(configs, store, LauncherConfig(name="inline")))

    threads = [threading.Thread(target=launcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [0, 0]
    assert logged.read().count("10 runs: 10 new") == 2  # both launchers set out to train all ten
    assert Counter(trained) == {c.run_id(): 1 for c in configs}  # each run trained exactly once
    for c in configs:
        rd = store.run_dir(c.group, c.run_id())
        assert rd.status()["state"] == "finished"
        assert [r["epoch"] for r in rd.read_metrics()] == list(range(c.train.epochs))


def claimed_run(cfg: RunConfig, store: Store) -> tuple[RunDir, claim.Claim]:
    """The run prepared as a launcher leaves it, its claim held (by another open in this process,
    which conflicts as another process would) and its status written by that holder."""
    rd = store.run_dir(cfg.group, cfg.run_id())
    rd.write_config(cfg.to_dict())
    held = claim.try_claim(rd)
    rd.set_status("running", epochs_done=1, epochs=cfg.train.epochs)
    return rd, held


@pytest.fixture
def impatient(monkeypatch):
    monkeypatch.setattr(claim, "PATIENCE_S", 0.1)


def test_a_claimed_run_is_left_alone_with_one_line_and_its_status_unchanged(fast_config, store, impatient,
                                                                             monkeypatch, capsys, logged):
    cfg = fast_config()
    rd, held = claimed_run(cfg, store)
    before = rd.status_file.read_text()
    with held:
        result = run(cfg, store)
        assert result.state == "elsewhere" and not rd.metrics.exists()
        assert result.note == f"being trained elsewhere (by pid {os.getpid()} on host {claim.holder(rd)['host']} " \
                              f"since {claim.holder(rd)['since']}): left alone"

        assert cli(["run-one", str(rd.path)]) == 75  # the worker's exit: not a failure
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == f"{rd.path}: {result.note}\n"

        assert plan([cfg], store)[0].state == "running"  # the claim says it is live
        # the claim taken between a launcher's plan and its start: each launcher leaves the run alone
        monkeypatch.setattr("mmbalance.bench.launch.plan", lambda configs, store: [PlannedRun(cfg, rd, "new", "new")])
        for name in ("inline", "local"):
            assert launch([cfg], store, LauncherConfig(name=name)) == 0
            out = logged.read()
            assert "1 runs: 1 being trained elsewhere" in out and f"by pid {os.getpid()}" in out, out
            assert rd.status_file.read_text() == before and not rd.metrics.exists()
        # a run-one process that exits as left alone, or dies after another process took its run
        assert record_exit(rd, EXIT_ELSEWHERE) == "elsewhere" and record_exit(rd, -9) == "elsewhere"
        # slurm: neither submitted nor started by a packed task
        submitted = []
        executor = type("Executor", (), {"map_array": lambda self, fn, args: submitted.extend(args) or []})()
        assert slurm.submit([PlannedRun(cfg, rd, "new", "new")], executor) == [] and submitted == []
        monkeypatch.setattr(slurm, "placement", lambda: {"job_id": "9_1"})
        assert slurm.PackedSweepJob()([str(rd.path)]) == {str(rd.path): "elsewhere"}
        assert rd.status_file.read_text() == before and not (rd.path / "run.log").exists()
    assert not claim.is_held(rd) and claim.claim_path(rd).read_text() == ""  # released, holder record cleared


def test_a_run_finished_while_its_claim_was_awaited_is_skipped_and_stays_finished(fast_config, store):
    cfg = fast_config()
    assert run(cfg, store).state == "finished"
    rd = store.run_dir(cfg.group, cfg.run_id())
    metrics = rd.metrics.read_text()
    rd.set_status("pending")  # what a launcher that planned it before it finished writes
    assert run(cfg, store).state == "skipped"
    assert rd.status()["state"] == "finished" and rd.metrics.read_text() == metrics


def test_a_stale_running_record_whose_pid_was_reused_does_not_block_the_run(fast_config, store, monkeypatch, logged):
    from mmbalance.bench.launch import jobs

    monkeypatch.setattr(jobs, "queued_job_ids", lambda: None)  # a machine without SLURM
    cfg = fast_config()
    run_interrupted(cfg, store, monkeypatch, at_epoch=2)
    rd = store.run_dir(cfg.group, cfg.run_id())
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the killed run's record names a pid that a live, unrelated process has now
        rd.set_status("running", epochs_done=2, epochs=4)
        record = rd.status()
        rd.status_file.write_text(json.dumps({**record, "pid": unrelated.pid}))
        assert plan([cfg], store)[0].state == "resume"
        assert "running (stale: process gone)" in status_table(store.root / cfg.group)
        assert launch([cfg], store, LauncherConfig(name="inline")) == 0
    finally:
        unrelated.kill()
        unrelated.wait()
    assert "1 runs: 1 finished" in logged.read()
    assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2, 3]


def test_leftover_temp_files_are_removed_on_the_next_claim(fast_config, store, monkeypatch):
    cfg = fast_config()
    run_interrupted(cfg, store, monkeypatch, at_epoch=1)
    rd = store.run_dir(cfg.group, cfg.run_id())
    # what a kill -9 during atomic_write leaves: files only the trainer writes, and a status
    # write of an hour ago; a launcher's status write in progress right now is not touched
    leftovers = [rd.path / ".checkpoint.pt.k9x1ab2c.tmp", rd.path / ".metrics.jsonl.q7w3e5r1.tmp",
                 rd.path / ".best.pt.a1b2c3d4.tmp", rd.path / ".status.json.old12345.tmp"]
    in_progress = rd.path / ".status.json.new12345.tmp"
    for path in [*leftovers, in_progress]:
        path.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(leftovers[-1], (hour_ago, hour_ago))
    assert run(cfg, store).state == "finished"
    assert sorted(rd.path.glob(".*.tmp")) == [in_progress]


def mark_pending_elsewhere(rd: RunDir, cfg: RunConfig) -> subprocess.Popen:
    """A launcher process that marks the run pending (bench.launch.worker.mark_pending), says so
    and waits for its stdin to close."""
    code = ("import sys; from mmbalance.bench.store import RunDir; "
            "from mmbalance.bench.launch.worker import mark_pending; "
            f"print(mark_pending(RunDir({str(rd.path)!r}), {cfg.to_dict()!r}), flush=True); sys.stdin.read()")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline() == "pending\n"
    return launcher


def test_pending_runs_of_a_dead_launcher_are_shown_stale(fast_config, store, monkeypatch):
    from mmbalance.bench.launch import jobs

    monkeypatch.setattr(jobs, "queued_job_ids", lambda: None)
    cfg = fast_config()
    rd = store.run_dir(cfg.group, cfg.run_id())
    launcher = mark_pending_elsewhere(rd, cfg)
    recorded = rd.status()["launcher"]
    assert recorded["pid"] == launcher.pid and recorded["start"] == claim.start_time(launcher.pid)
    table = status_table(store.root / cfg.group)
    assert "| pending " in table and "stale" not in table
    assert plan([cfg], store)[0].state == "queued"  # the live launcher will start it

    # its pid reused by another process: the start time tells them apart
    rd.status_file.write_text(json.dumps({**rd.status(), "launcher": {**recorded, "start": recorded["start"] - 1}}))
    assert "pending (stale: launcher gone)" in status_table(store.root / cfg.group)
    assert plan([cfg], store)[0].state == "new"

    rd.status_file.write_text(json.dumps({**rd.status(), "launcher": recorded}))
    launcher.stdin.close()
    launcher.wait()
    table = status_table(store.root / cfg.group)
    assert "pending (stale: launcher gone)" in table and "(1 stale: launch again to resume)" in table
    assert plan([cfg], store)[0].state == "new"


def test_a_filesystem_without_locks_refuses_in_one_line_naming_the_mount(fast_config, store, monkeypatch):
    from mmbalance.core.errors import StoreError

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(claim.fcntl, "flock", no_locks)
    cfg = fast_config()
    rd = store.run_dir(cfg.group, cfg.run_id())
    with pytest.raises(StoreError) as refused:
        run(cfg, store)
    assert str(refused.value) == (
        f"{rd.path}: the filesystem at {claim.mount_of(rd.path)} does not support file locks (No locks available), "
        "which the run claims need (one trainer per run); put the results store on a filesystem with locks "
        "(see README, 'Results store')")
    assert claim.mount_of(rd.path).endswith(")") and not rd.status_file.exists()
