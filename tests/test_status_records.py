"""What status.json records about where a run ran: log paths relative to the store (a copied store
names its own logs), `restarts` counting every requeue of its SLURM job, and, with SLURM not
answering (slurmctld down), neither a dry run nor a relaunch taking live jobs for dead ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.bench.status import status_table
from mmbalance.bench.store import Store
from mmbalance.bench.sweep import load_sweep

SWEEP = """
group: down
base:
  dataset: {name: gaussian}
  train: {epochs: 2, batch_size: 32, progress: false}
  eval: {probe_c_grid: [1.0]}
seeds: [0, 1, 2]
cells:
  joint: {method: {name: joint}}
launcher: {name: slurm}
"""


def test_log_paths_are_relative_to_the_store_and_a_copied_store_names_its_own(tmp_path):
    store = Store(tmp_path / "results")
    rd = store.run_dir("g", "joint-a")
    rd.write_config({"dataset": {"name": "gaussian"}, "method": {"name": "joint"}, "train": {"seed": 0, "epochs": 2}})
    rd.set_status("failed", error="boom", log=str(rd.path / "run.log"), stdout="/elsewhere/77.out")
    assert rd.status()["log"] == "g/joint-a/run.log"
    assert rd.status()["stdout"] == "/elsewhere/77.out"  # outside the store: kept as it is
    (rd.path / "run.log").write_text("boom\n")

    copy = Store(tmp_path / "copy")
    shutil.copytree(store.root, copy.root)
    shutil.rmtree(store.root)
    copied = copy.run_dir("g", "joint-a")
    assert copied.resolve(copied.status()["log"]) == copied.path / "run.log"
    assert f"log: {copied.path / 'run.log'}" in status_table(copy.root)


def test_restarts_count_every_requeue_of_the_job(tmp_path, monkeypatch):
    from mmbalance.bench.launch.slurm import mark_requeued
    from mmbalance.bench.launch.worker import record_placement

    rd = Store(tmp_path).run_dir("g", "joint-a")
    rd.set_status("running", job_id="5_0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued twice by `scontrol requeue`
    record_placement(rd, job_id="5_0")
    assert rd.status()["restarts"] == 2 and rd.status()["state"] == "running"
    mark_requeued(rd)  # a time-out that submitit's checkpoint requeues
    assert rd.status()["restarts"] == 3
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")  # the same requeue, as the requeued job sees it
    record_placement(rd, job_id="5_0")
    assert rd.status()["restarts"] == 3


@pytest.fixture
def slurm_down(tmp_path, monkeypatch):
    """squeue installed but failing as it does with slurmctld down; 3 runs: one pending and one
    running under jobs nobody can ask about, one new."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\n"
                      "echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2\n"
                      "exit 1\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(shutil.which('sh')).parent}")
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    rds = [store.run_dir(c.group, c.run_id()) for c in configs]
    for rd, cfg, (state, job) in zip(rds, configs, [("pending", "55_0"), ("running", "55_1")]):
        rd.write_config(cfg.to_dict())
        rd.set_status(state, job_id=job)
    (rds[1].path / "checkpoint.pt").write_bytes(b"")  # started: without SLURM's word it would "resume"
    return path, store, rds


def test_a_dry_run_with_slurm_not_answering_leaves_live_jobs_unknown(slurm_down, capsys):
    path, store, rds = slurm_down
    assert cli(["--results", str(store.root), "sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs: 2 unknown (SLURM not answering: squeue failed; left alone until it answers), 1 new" in out
    assert "will resume" not in out
    assert f"{rds[0].run_id}  unknown (was pending)" in out and f"{rds[1].run_id}  unknown (was running)" in out


def test_a_relaunch_with_slurm_not_answering_fails_in_one_line_and_changes_nothing(slurm_down, monkeypatch, capsys):
    from submitit.core.utils import FailedJobError

    from mmbalance.bench.launch import slurm

    path, store, rds = slurm_down
    before = [rd.status_file.read_text() for rd in rds[:2]]

    class Refused:
        def map_array(self, fn, args):
            raise FailedJobError("sbatch: error: Batch job submission failed: Unable to contact slurm controller "
                                 "(connect failure)\n")

    monkeypatch.setattr(slurm, "make_executor", lambda *a, **k: Refused())
    assert cli(["-q", "--results", str(store.root), "sweep", str(path)]) == 2  # -q: no progress lines
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "error: sbatch failed: sbatch: error: Batch job submission failed: Unable to contact slurm controller "
        "(connect failure); nothing was submitted, the runs are as they were (is SLURM up? try `sinfo`)"]
    assert [rd.status_file.read_text() for rd in rds[:2]] == before  # not taken for dead, not resubmitted
    assert not rds[2].status_file.exists()


def test_status_with_slurm_not_answering_marks_job_runs_unchecked_and_says_why(slurm_down, capsys):
    _, store, rds = slurm_down
    rds[1].checkpoint.unlink()  # the fixture's empty stand-in would show the run as damaged
    assert cli(["status", str(store.root / rds[0].path.parent.name)]) == 0
    out = capsys.readouterr().out
    assert "pending (unchecked: no word from SLURM)" in out and "running (unchecked: no word from SLURM)" in out
    assert "(2 unchecked: no word from SLURM)" in out
    assert out.rstrip().endswith(
        "note: squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure); "
        "2 run(s) under SLURM jobs show their recorded state, not checked against the queue (run status again "
        "once SLURM answers)")
