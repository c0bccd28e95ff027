"""Launchers: local worker processes, SLURM submission through submitit (mocked executor and
submitit's local executor; the real-SLURM tests are marked `slurm`), status and cancel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main as cli
from bench.launch import launch
from bench.launch.options import LauncherConfig
from bench.store import Store
from bench.sweep import load_sweep

SWEEP = """
group: two
base:
  dataset: {name: gaussian}
  train: {epochs: 2, batch_size: 32, progress: false}
  optim: {lr: 0.05}
  eval: {probe_c_grid: [1.0]}
seeds: [0, 1]
cells:
  joint: {method: {name: joint}}
  audio-only: {method: {name: unimodal, modality: audio}}
launcher: {name: local, workers: 2}
"""
# a learning rate this large makes the loss non-finite in the first epoch: a run that raises
DIVERGES = "  diverges: {method: {name: joint}, optim.lr: 1.0e+30}\n"
FAILING = SWEEP.replace("  audio-only: {method: {name: unimodal, modality: audio}}\n", DIVERGES)


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def statuses(store: Store) -> dict[str, dict]:
    return {rd.run_id: rd.status() for rd in store.runs()}


def test_local_launcher_finishes_the_sweep_records_a_failure_and_relaunch_does_nothing(tmp_path, capsys):
    store = Store(tmp_path / "results")
    failing = write(tmp_path, FAILING)  # 2 cells x 2 seeds; one cell diverges
    code = cli(["--results", str(store.root), "sweep", str(failing)])
    out = capsys.readouterr().out
    assert code == 1  # not every run finished
    assert "local: 4 runs on 2 worker process(es)" in out
    _, configs = load_sweep(failing)
    bad = next(c for c in configs if c.label == "diverges").run_id()
    st = statuses(store)
    assert sorted(s["state"] for s in st.values()) == ["failed", "failed", "finished", "finished"]
    assert st[bad]["error"] == "loss 'loss' became nan at epoch 0, batch 1"
    assert "NonFiniteLoss" in st[bad]["traceback"] and "Traceback" in st[bad]["traceback"]
    log = Path(st[bad]["log"])
    assert log == store.root / "two" / bad / "run.log" and "NonFiniteLoss" in log.read_text()
    for rid, s in st.items():
        assert (store.root / "two" / rid / "summary.json").exists() == (s["state"] == "finished")

    assert cli(["status", str(store.root / "two")]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 2 finished, 0 running, 0 pending, 2 failed, 0 interrupted" in out
    assert f"two/{bad} (diverges, seed {next(c for c in configs if c.run_id() == bad).train.seed}): loss 'loss' became nan at epoch 0, batch 1\n    log: {log}" in out

    before = {rd.run_id: rd.status_file.stat().st_mtime_ns for rd in store.runs()}
    finished = write(tmp_path, FAILING.replace(DIVERGES, ""), "ok.yaml")
    assert cli(["--results", str(store.root), "sweep", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 finished" in out and "local:" not in out  # nothing was started
    assert {rd.run_id: rd.status_file.stat().st_mtime_ns for rd in store.runs()} == before


def test_local_workers_split_the_cores_and_gpus(monkeypatch):
    from bench.launch import local

    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    env = local.worker_env(slot=3, workers=2, gpus=2)
    assert env["OMP_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert local.worker_env(slot=0, workers=16, gpus=0)["OMP_NUM_THREADS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in local.worker_env(slot=0, workers=1, gpus=0) or \
        local.worker_env(slot=0, workers=1, gpus=0)["CUDA_VISIBLE_DEVICES"] == local.os.environ.get("CUDA_VISIBLE_DEVICES")


# ---------------------------------------------------------------- slurm (no cluster needed)


class FakePaths:
    def __init__(self, job_id: str) -> None:
        self.stdout = Path(f"/logs/{job_id}.out")
        self.stderr = Path(f"/logs/{job_id}.err")


class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.paths = FakePaths(job_id)


class FakeExecutor:
    """Stands in for submitit's executor: records what is submitted, starts nothing."""

    def __init__(self, fail: bool = False) -> None:
        self.submitted: list[list[str]] = []
        self.fail = fail

    def map_array(self, fn, args):
        if self.fail:
            raise RuntimeError("sbatch: error: invalid partition specified: nope")
        self.submitted.append(list(args))
        return [FakeJob(f"77_{i}") for i in range(len(args))]


@pytest.fixture
def slurm_world(tmp_path, monkeypatch):
    """A sweep of 4 runs, one finished and one held by a queued job; squeue and the executor faked."""
    from bench.launch import jobs, slurm

    queue = {"55_0"}
    monkeypatch.setattr(jobs, "queued_job_ids", lambda: set(queue))
    executor = FakeExecutor()
    made = []
    monkeypatch.setattr(slurm, "make_executor", lambda *a, **k: made.append(a) or executor)
    _, configs = load_sweep(write(tmp_path, SWEEP))
    store = Store(tmp_path / "results")
    done, held = (store.run_dir(c.group, c.run_id()) for c in configs[:2])
    done.write_config(configs[0].to_dict())
    done.write_summary({"ok": 1})
    done.set_status("finished")
    held.write_config(configs[1].to_dict())
    held.set_status("pending", job_id="55_0", log="/logs/55_0.err")
    return configs, store, executor, queue, made


def test_slurm_submits_only_what_is_missing_and_records_job_ids(slurm_world, capsys):
    configs, store, executor, queue, made = slurm_world
    code = launch(configs, store, LauncherConfig(name="slurm", partition="gpu"))
    assert code == 0
    todo = [store.run_dir(c.group, c.run_id()) for c in configs[2:]]
    assert executor.submitted == [[str(rd.path.resolve()) for rd in todo]]
    assert made[0][0] == store.root / "two" / ".submitit" and made[0][1].partition == "gpu"
    for i, rd in enumerate(todo):
        st = rd.status()
        assert (st["state"], st["job_id"], st["log"]) == ("pending", f"77_{i}", f"/logs/77_{i}.err")
        assert rd.config.exists()
    st = statuses(store)
    assert st[configs[0].run_id()]["state"] == "finished"
    assert st[configs[1].run_id()]["job_id"] == "55_0"
    out = capsys.readouterr().out
    assert "submitted 2 run(s) as job array 77 (77_0 .. 77_1)" in out

    queue |= {"77_0", "77_1"}
    assert launch(configs, store, LauncherConfig(name="slurm")) == 0
    assert len(executor.submitted) == 1  # everything is finished or queued: nothing submitted
    assert "4 runs: 1 finished, 3 queued" in capsys.readouterr().out


def test_a_failed_submission_leaves_the_runs_as_they_were(slurm_world):
    configs, store, executor, _, _ = slurm_world
    executor.fail = True
    with pytest.raises(RuntimeError, match="invalid partition"):
        launch(configs, store, LauncherConfig(name="slurm"))
    for c in configs[2:]:
        assert not store.run_dir(c.group, c.run_id()).status_file.exists()


def test_status_and_cancel_of_queued_and_vanished_jobs(slurm_world, monkeypatch, capsys):
    configs, store, _, queue, _ = slurm_world
    launch(configs, store, LauncherConfig(name="slurm"))
    capsys.readouterr()
    queue |= {"77_0"}  # 77_1 has left the queue without recording an end (killed, say)
    assert cli(["status", str(store.root / "two")]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 1 finished, 0 running, 3 pending, 0 failed, 0 interrupted (1 stale: launch again to resume)" in out
    assert "pending (stale: job gone)" in out and "77_1" in out

    cancelled = []
    monkeypatch.setattr("bench.launch.jobs.cancel_jobs", lambda ids: cancelled.extend(ids) or "")
    assert cli(["cancel", str(store.root / "two")]) == 0
    out = capsys.readouterr().out
    assert sorted(cancelled) == ["55_0", "77_0"]
    assert "cancelled 2 job(s): " in out
    st = statuses(store)
    assert st[configs[1].run_id()]["state"] == "interrupted" and "cancelled" in st[configs[1].run_id()]["error"]
    assert st[configs[2].run_id()]["state"] == "interrupted"
    assert st[configs[3].run_id()]["state"] == "pending"  # its job is gone: nothing to cancel


def test_the_executor_gets_the_sweep_sbatch_options(monkeypatch, tmp_path):
    from bench.launch import slurm

    seen: dict = {}

    class Auto:
        def __init__(self, folder, cluster=None, **kwargs):
            seen["init"] = (folder, cluster, kwargs)

        def update_parameters(self, **params):
            seen["params"] = params

    monkeypatch.setattr(slurm.submitit, "AutoExecutor", Auto)
    options = LauncherConfig(name="slurm", partition="p", account="a", qos="q", time_min=90, gpus_per_task=0,
                             cpus_per_task=4, mem_gb=16, array_parallelism=3, constraint="h100",
                             sbatch_extra={"exclusive": True})
    slurm.make_executor(tmp_path, options, "mmb-x")
    params = seen["params"]
    assert seen["init"] == (tmp_path, None, {"slurm_max_num_timeout": 10})
    assert params["slurm_partition"] == "p" and params["slurm_account"] == "a" and params["slurm_qos"] == "q"
    assert (params["timeout_min"], params["cpus_per_task"], params["mem_gb"]) == (90, 4, 16)
    assert params["slurm_array_parallelism"] == 3 and params["slurm_constraint"] == "h100"
    assert params["slurm_additional_parameters"] == {"exclusive": True}
    assert params["slurm_setup"] == ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    assert "slurm_gpus_per_task" not in params  # 0 GPUs: no --gpus-per-task at all


def test_checkpoint_marks_the_run_pending_and_requeues_the_same_call(tmp_path):
    from bench.launch.slurm import SweepJob

    store = Store(tmp_path)
    rd = store.run_dir("g", "joint-abc")
    rd.set_status("running", job_id="9_1", log="/logs/9_1.err", epoch=1)
    job = SweepJob()
    delayed = job.checkpoint(str(rd.path))
    assert delayed.function is job and delayed.args == (str(rd.path),)
    st = rd.status()
    assert st["state"] == "pending" and st["job_id"] == "9_1" and "requeued" in st["note"]
    assert st["restarts"] == 1
    rd.set_status("running", epoch=2)  # the requeued job starts again: the count stays
    job.checkpoint(str(rd.path))
    assert rd.status()["restarts"] == 2


@pytest.mark.slow  # ~20 s: two job processes that import torch; the `slurm` tests cover it on a real SLURM
def test_submitit_local_executor_runs_the_array_and_records_failures(tmp_path, capsys):
    """The real submitit path (pickled Checkpointable, array tasks in their own processes, job
    environment), with submitit's local executor standing in for SLURM."""
    store = Store(tmp_path / "results")
    _, configs = load_sweep(write(tmp_path, FAILING.replace("seeds: [0, 1]", "seeds: [0]")))
    code = launch(configs, store, LauncherConfig(name="slurm", time_min=60), wait=True, cluster="local", poll_s=0.5)
    out = capsys.readouterr().out
    assert code == 1 and "2 runs: 1 finished, 1 failed" in out
    st = statuses(store)
    bad = next(c for c in configs if c.label == "diverges").run_id()
    assert st[bad]["state"] == "failed" and "NonFiniteLoss" in st[bad]["traceback"]
    for s in st.values():
        assert s["job_id"] and Path(s["log"]).exists()
        assert Path(s["log"]).parent.parent == store.root / "two" / ".submitit" or \
            Path(s["log"]).parent == store.root / "two" / ".submitit"
    assert "NonFiniteLoss" in Path(st[bad]["log"]).read_text()
    assert json.loads((store.root / "two" / bad / "status.json").read_text())["error"].startswith("loss 'loss'")


def test_wait_on_an_earlier_launch_then_jobs_gone_without_an_end_are_interrupted(slurm_world, monkeypatch, capsys):
    from bench.launch import jobs

    configs, store, executor, queue, _ = slurm_world
    launch(configs, store, LauncherConfig(name="slurm"))
    answers = iter([{"55_0", "77_0", "77_1"}] * 3)  # plan, then two polls; then the queue is empty
    monkeypatch.setattr(jobs, "queued_job_ids", lambda: next(answers, set()))
    code = launch(configs, store, LauncherConfig(name="slurm"), wait=True, poll_s=0)
    out = capsys.readouterr().out
    assert code == 1 and len(executor.submitted) == 1  # waited on the queued jobs, submitted nothing
    assert "waiting: 3 of 3 job(s) queued or running" in out and "waiting: 0 of 3" in out
    assert "4 runs: 1 finished, 3 interrupted" in out
    st = statuses(store)[configs[2].run_id()]
    assert st["state"] == "interrupted" and st["error"].startswith("job 77_0 ended without recording an end")
