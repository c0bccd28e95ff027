"""`mmbalance cancel` while the cancelled job is still writing (SLURM's kill grace period): every
cancelled run ends `interrupted`, the job stops at its next status write keeping its checkpoint,
and a relaunch resumes it. No SLURM needed: the job's id is its environment's SLURM_JOB_ID and
the cancel comes from another thread mid-run (the real-SLURM test is in test_slurm.py)."""

from __future__ import annotations

import threading

import pytest

from mmbalance.bench.cancel import RunCancelled, own_job_id
from mmbalance.bench.status import cancel
from mmbalance.bench.store import Store
from tests.conftest import without_timing

JOB = "9_0"


@pytest.fixture
def in_job(monkeypatch):
    """This process is array task 9_0, which squeue lists; scancel does nothing (the job goes on)."""
    from mmbalance.bench.launch import jobs

    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "10")
    monkeypatch.setattr(jobs, "queued_job_ids", lambda: {JOB})
    monkeypatch.setattr(jobs, "cancel_jobs", lambda ids: "")
    return monkeypatch


def leave_the_job(monkeypatch) -> None:
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)


def test_own_job_id_is_the_array_task_as_submitit_names_it(monkeypatch):
    leave_the_job(monkeypatch)
    assert own_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert own_job_id() == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert own_job_id() == "40_3"


def test_a_run_cancelled_while_its_job_trains_stops_at_the_epoch_end_and_resumes(fast_config, tmp_path, in_job):
    from mmbalance.bench.train import Trainer, run

    cfg = fast_config()  # 4 epochs
    store = Store(tmp_path / "results")
    rd = store.run_dir(cfg.group, cfg.run_id())
    rd.write_config(cfg.to_dict())
    rd.set_status("pending", job_id=JOB)
    original = Trainer.train_epoch
    said = []

    def cancelled_during_epoch_2(self, epoch):
        if epoch == 2:  # `mmbalance cancel` from elsewhere while the job trains on
            canceller = threading.Thread(target=lambda: said.append(cancel(rd.path.parent)))
            canceller.start()
            canceller.join()
        return original(self, epoch)

    in_job.setattr(Trainer, "train_epoch", cancelled_during_epoch_2)
    with pytest.raises(RunCancelled, match=f"cancelled \\(job {JOB}, mmbalance cancel\\)"):
        run(cfg, store)
    assert said and f"cancelled 1 job(s): {JOB}" in said[0]
    status = rd.status()
    assert status["state"] == "interrupted" and status["error"] == f"job {JOB} cancelled (mmbalance cancel)", status
    # epoch 2 finished and was checkpointed; its end-of-epoch `running` was refused
    assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2]
    assert rd.load(rd.checkpoint)["epoch"] == 2

    in_job.setattr(Trainer, "train_epoch", original)
    leave_the_job(in_job)  # a relaunch (a new job, a local run): writes as usual and resumes
    assert run(cfg, store).state == "finished"
    assert "cancelled_job" not in rd.status()
    reference = run(cfg, Store(tmp_path / "reference"))
    assert without_timing(rd.read_metrics()) == without_timing(
        Store(tmp_path / "reference").run_dir(cfg.group, reference.run_id).read_metrics())


def test_cancel_waits_for_a_status_write_in_progress_and_the_job_cannot_undo_it(tmp_path, in_job):
    """The job reads the status and replaces it (running, end of an epoch) while cancel writes
    interrupted: with the status lock one waits for the other, so the job's record cannot land
    after the cancel's, and the job's next write is refused."""
    from mmbalance.bench import store as store_module

    rd = Store(tmp_path).run_dir("g", "joint-a")
    rd.write_config({"method": {"name": "joint"}})  # what `cancel` looks for
    rd.set_status("running", job_id=JOB, epochs_done=1)
    real = store_module.atomic_write_text
    job_writing, release = threading.Event(), threading.Event()

    def slow_job_write(path, text):
        if threading.current_thread().name == "job":
            job_writing.set()
            assert release.wait(10)
        real(path, text)

    in_job.setattr(store_module, "atomic_write_text", slow_job_write)
    job = threading.Thread(target=lambda: rd.set_status("running", epochs_done=2), name="job")
    job.start()
    assert job_writing.wait(10)
    said = []
    canceller = threading.Thread(target=lambda: said.append(cancel(rd.path.parent)))
    canceller.start()
    canceller.join(0.5)
    assert canceller.is_alive()  # waits for the job's write to be done
    release.set()
    job.join(10)
    canceller.join(10)
    assert f"cancelled 1 job(s): {JOB}" in said[0]
    assert rd.status()["state"] == "interrupted"
    with pytest.raises(RunCancelled):  # the job's next epoch end
        rd.set_status("running", epochs_done=3)
    with pytest.raises(RunCancelled):
        rd.set_status("failed", error="killed after the grace period")
    assert rd.status()["state"] == "interrupted" and rd.status()["cancelled_job"] == JOB


def test_only_the_cancelled_job_is_refused(tmp_path, monkeypatch):
    rd = Store(tmp_path).run_dir("g", "joint-a")
    rd.set_status("interrupted", job_id=JOB, cancelled_job=JOB)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # another task of the array
    rd.set_status("running")
    assert rd.status()["state"] == "running" and "cancelled_job" not in rd.status()

    rd.set_status("interrupted", cancelled_job=JOB)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    rd.set_status("finished")  # the cancelled job did finish before it was killed: that is recorded
    assert rd.status()["state"] == "finished"
