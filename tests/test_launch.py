"""Launchers: local worker processes, SLURM submission through submitit (mocked executor and
submitit's local executor; the real-SLURM tests are marked `slurm`), status and cancel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.bench.launch import launch
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.store import Store
from mmbalance.bench.sweep import load_sweep
from tests.conftest import as_at_a_terminal, stand_in_summary

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
    err = capsys.readouterr().err  # the launch's progress; stdout has the table
    assert code == 1  # not every run finished
    assert "local: 4 runs on 2 worker process(es)" in err
    assert "warning: not finished:\n" in err
    _, configs = load_sweep(failing)
    bad = next(c for c in configs if c.label == "diverges").run_id()
    st = statuses(store)
    assert sorted(s["state"] for s in st.values()) == ["failed", "failed", "finished", "finished"]
    assert st[bad]["error"] == "loss 'loss' became nan at epoch 0, batch 1"
    assert "NonFiniteLoss" in st[bad]["traceback"] and "Traceback" in st[bad]["traceback"]
    assert st[bad]["log"] == f"two/{bad}/run.log"  # relative to the store: a copied store names its own
    log = store.run_dir("two", bad).resolve(st[bad]["log"])
    assert log == store.root / "two" / bad / "run.log" and "NonFiniteLoss" in log.read_text()
    for rid, s in st.items():
        assert (store.root / "two" / rid / "summary.json").exists() == (s["state"] == "finished")

    assert cli(["status", str(store.root / "two")]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 2 finished, 0 running, 0 pending, 2 failed, 0 interrupted" in out
    seed = next(c for c in configs if c.run_id() == bad).train.seed
    assert f"two/{bad} (diverges, seed {seed}): loss 'loss' became nan at epoch 0, batch 1\n    log: {log}" in out

    before = {rd.run_id: rd.status_file.stat().st_mtime_ns for rd in store.runs()}
    finished = write(tmp_path, FAILING.replace(DIVERGES, ""), "ok.yaml")
    assert cli(["--results", str(store.root), "sweep", str(finished)]) == 0
    err = capsys.readouterr().err
    assert "2 runs: 2 finished" in err and "local:" not in err  # nothing was started
    assert {rd.run_id: rd.status_file.stat().st_mtime_ns for rd in store.runs()} == before


def test_local_workers_split_the_cores_and_gpus(monkeypatch):
    from mmbalance.bench.launch import local

    monkeypatch.setattr(local, "cpu_share", lambda: 8)
    env = local.worker_env(slot=3, workers=2, gpus=2)
    assert env["OMP_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert local.worker_env(slot=0, workers=16, gpus=0)["OMP_NUM_THREADS"] == "1"
    no_gpu = local.worker_env(slot=0, workers=1, gpus=0)
    assert no_gpu.get("CUDA_VISIBLE_DEVICES") == local.os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("k, gpus_of_slots", [
    (1, ["0", "1", "0", "1"]),  # K=1: one run per GPU, round robin past GPUs x 1
    (2, ["0", "0", "1", "1"]),  # GPU-major: slots 0..K-1 on GPU 0
    (4, ["0", "0", "0", "0"]),
])
def test_packed_workers_fill_each_gpu_k_at_a_time_and_split_the_cores(monkeypatch, k, gpus_of_slots):
    from mmbalance.bench.launch import local

    monkeypatch.setattr(local, "cpu_share", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    envs = [local.worker_env(slot, workers=4, gpus=2, runs_per_gpu=k) for slot in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == gpus_of_slots
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"2"}  # 8 cores / 4 workers, whatever K
    # the default worker count: GPUs x K, never more than there are runs; without a GPU, K if
    # given, else one per core a run uses (the thread policy's threads per run)
    assert local.worker_count(LauncherConfig(name="local", runs_per_gpu=k), gpus=2, runs=100) == 2 * k
    assert local.worker_count(LauncherConfig(name="local", runs_per_gpu=k), gpus=0, runs=100) == k
    assert local.worker_count(LauncherConfig(name="local"), gpus=0, runs=100) == 8
    assert local.worker_count(LauncherConfig(name="local"), gpus=0, runs=100, threads=3) == 2
    assert local.worker_count(LauncherConfig(name="local"), gpus=0, runs=5) == 5
    assert local.worker_count(LauncherConfig(name="local", runs_per_gpu=k), gpus=2, runs=3) == min(2 * k, 3)
    assert local.worker_count(LauncherConfig(name="local", runs_per_gpu=k, workers=3), gpus=2, runs=100) == 3
    # a CPU-only machine: K processes split the cores, no GPU is named
    cpu = [local.worker_env(slot, workers=k, gpus=0, runs_per_gpu=k) for slot in range(k)]
    assert {e["OMP_NUM_THREADS"] for e in cpu} == {str(8 // k)}
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in cpu)


def test_packed_gpus_respect_an_inherited_cuda_visible_devices(monkeypatch):
    from mmbalance.bench.launch import local

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [local.worker_env(s, 4, 2, 2)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == ["2", "2", "3", "3"]


def test_the_launch_line_names_the_placement(monkeypatch):
    from mmbalance.bench.launch.local import placement_line

    assert placement_line(4, workers=2, gpus=1, runs_per_gpu=2, threads=8) == \
        "local: 4 runs on 1 GPU x 2 runs per GPU, 8 thread(s) each"
    assert placement_line(8, workers=4, gpus=2, runs_per_gpu=2, threads=4) == \
        "local: 8 runs on 2 GPU x 2 runs per GPU, 4 thread(s) each"
    assert placement_line(3, workers=2, gpus=0, runs_per_gpu=2, threads=1) == \
        "local: 3 runs on 2 worker process(es) (no GPU), 1 thread(s) each"
    # an explicit worker count that is not GPUs x K: said, and the runs per GPU shown
    assert placement_line(9, workers=3, gpus=2, runs_per_gpu=2, threads=1).endswith(
        "(workers=3 is not GPUs x 2: runs at once per GPU [2, 1])")
    assert placement_line(9, workers=6, gpus=2, runs_per_gpu=2, threads=1).endswith(
        "(workers=6 is not GPUs x 2: runs at once per GPU [4, 2])")


def test_the_launch_line_has_the_threads_the_runs_will_use(monkeypatch, fast_config):
    """run_thread_count: the thread policy (bench.threads) with each worker's share of the cores."""
    from mmbalance.bench.launch import local
    from mmbalance.bench.launch.plan import PlannedRun

    monkeypatch.setattr(local, "cpu_share", lambda: 16)
    planned = [PlannedRun(cfg, None, "new", "") for cfg in (fast_config(), fast_config("train.seed=1"))]
    assert local.run_thread_count(planned, gpus=0, workers=16) == 1  # auto on CPU: one each
    assert local.run_thread_count(planned, gpus=1, workers=2) == 8  # auto on a GPU: the share (16 / 2)
    assert local.run_thread_count(planned, gpus=1, workers=8) == 2
    planned.append(PlannedRun(fast_config("train.seed=2", "train.threads=3"), None, "new", ""))
    assert local.run_thread_count(planned, gpus=0, workers=16) == 3
    cpu = PlannedRun(fast_config("train.device=cpu"), None, "new", "")
    assert local.run_thread_count([cpu], gpus=1, workers=2) == 1  # device cpu on a GPU machine


def test_runs_per_gpu_defaults_per_launcher_and_is_validated():
    from pydantic import ValidationError

    from mmbalance.bench.launch.options import DEFAULT_RUNS_PER_GPU

    assert LauncherConfig(name="slurm").packing() == 1  # one run per array task unless asked
    assert LauncherConfig(name="local").packing() == DEFAULT_RUNS_PER_GPU["local"]
    assert LauncherConfig(name="local", runs_per_gpu=3).packing() == 3
    with pytest.raises(ValidationError, match="runs_per_gpu"):
        LauncherConfig(name="local", runs_per_gpu=0)


def test_a_packed_local_sweep_runs_two_runs_side_by_side_on_one_gpu(tmp_path, monkeypatch, capsys):
    """K=2 on one (faked) GPU: two worker processes for the one GPU; CUDA_VISIBLE_DEVICES=0 names
    a GPU this machine may not have, where device auto trains on the CPU."""
    from mmbalance.bench.launch import local

    monkeypatch.setattr(local, "gpu_count", lambda: 1)
    store = Store(tmp_path / "results")
    path = write(tmp_path, SWEEP.replace("seeds: [0, 1]", "seeds: [0]").replace("workers: 2", "runs_per_gpu: 2"))
    assert cli(["--results", str(store.root), "sweep", str(path)]) == 0
    assert "local: 2 runs on 1 GPU x 2 runs per GPU" in capsys.readouterr().err
    st = statuses(store)
    assert sorted(s["state"] for s in st.values()) == ["finished", "finished"]
    for rid, s in st.items():  # each ran in a worker process of its own, logging to its run.log
        assert not s.get("job_id") and s["log"] == f"two/{rid}/run.log"
        assert (store.root / "two" / rid / "summary.json").exists()


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
    from mmbalance.bench.launch import jobs, slurm

    queue = {"55_0"}
    monkeypatch.setattr(jobs, "queued_job_ids", lambda: set(queue))
    executor = FakeExecutor()
    made = []
    monkeypatch.setattr(slurm, "make_executor", lambda *a, **k: made.append(a) or executor)
    _, configs = load_sweep(write(tmp_path, SWEEP))
    store = Store(tmp_path / "results")
    done, held = (store.run_dir(c.group, c.run_id()) for c in configs[:2])
    done.write_config(configs[0].to_dict())
    done.write_summary(stand_in_summary())
    done.set_status("finished")
    held.write_config(configs[1].to_dict())
    held.set_status("pending", job_id="55_0", log="/logs/55_0.err")
    return configs, store, executor, queue, made


def test_slurm_submits_only_what_is_missing_and_records_job_ids(slurm_world, logged):
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
    assert "submitted 2 run(s) as job array 77 (77_0 .. 77_1)" in logged.read()

    queue |= {"77_0", "77_1"}
    assert launch(configs, store, LauncherConfig(name="slurm")) == 0
    assert len(executor.submitted) == 1  # everything is finished or queued: nothing submitted
    assert "4 runs: 1 finished, 3 queued" in logged.read()


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
    monkeypatch.setattr("mmbalance.bench.launch.jobs.cancel_jobs", lambda ids: cancelled.extend(ids) or "")
    assert cli(["cancel", str(store.root / "two")]) == 0
    out = capsys.readouterr().out
    assert sorted(cancelled) == ["55_0", "77_0"]
    assert "cancelled 2 job(s): " in out
    st = statuses(store)
    assert st[configs[1].run_id()]["state"] == "interrupted" and "cancelled" in st[configs[1].run_id()]["error"]
    assert st[configs[2].run_id()]["state"] == "interrupted"
    assert st[configs[3].run_id()]["state"] == "pending"  # its job is gone: nothing to cancel


def test_the_executor_gets_the_sweep_sbatch_options(monkeypatch, tmp_path):
    from mmbalance.bench.launch import slurm

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
    from mmbalance.bench.launch.slurm import SweepJob

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
def test_submitit_local_executor_runs_the_array_and_records_failures(tmp_path, logged):
    """The real submitit path (pickled Checkpointable, array tasks in their own processes, job
    environment), with submitit's local executor standing in for SLURM."""
    store = Store(tmp_path / "results")
    _, configs = load_sweep(write(tmp_path, FAILING.replace("seeds: [0, 1]", "seeds: [0]")))
    code = launch(configs, store, LauncherConfig(name="slurm", time_min=60), wait=True, cluster="local", poll_s=0.5)
    assert code == 1 and "2 runs: 1 finished, 1 failed" in logged.read()
    st = statuses(store)
    bad = next(c for c in configs if c.label == "diverges").run_id()
    assert st[bad]["state"] == "failed" and "NonFiniteLoss" in st[bad]["traceback"]
    logs = {rid: store.run_dir("two", rid).resolve(s["log"]) for rid, s in st.items()}
    for rid, s in st.items():
        assert s["job_id"] and s["log"].startswith("two/.submitit/") and logs[rid].exists()
    assert "NonFiniteLoss" in logs[bad].read_text()
    assert json.loads((store.root / "two" / bad / "status.json").read_text())["error"].startswith("loss 'loss'")


def test_wait_on_an_earlier_launch_then_jobs_gone_without_an_end_are_interrupted(slurm_world, monkeypatch, logged):
    from mmbalance.bench.launch import jobs

    configs, store, executor, queue, _ = slurm_world
    launch(configs, store, LauncherConfig(name="slurm"))
    answers = iter([{"55_0", "77_0", "77_1"}] * 3)  # plan, then two polls; then the queue is empty
    monkeypatch.setattr(jobs, "queued_job_ids", lambda: next(answers, set()))
    code = launch(configs, store, LauncherConfig(name="slurm"), wait=True, poll_s=0)
    out = logged.read()
    assert code == 1 and len(executor.submitted) == 1  # waited on the queued jobs, submitted nothing
    assert "waiting: 3 of 3 job(s) queued or running" in out and "waiting: 0 of 3" in out
    assert "4 runs: 1 finished, 3 interrupted" in out
    st = statuses(store)[configs[2].run_id()]
    assert st["state"] == "interrupted" and st["error"].startswith("job 77_0 ended without recording an end")


# ---------------------------------------------------------------- slurm, K runs per array task


def test_packed_slurm_submits_chunks_of_k_runs_one_array_task_each(slurm_world, logged):
    configs, store, executor, queue, _ = slurm_world
    assert launch(configs, store, LauncherConfig(name="slurm", runs_per_gpu=2, cpus_per_task=4)) == 0
    todo = [store.run_dir(c.group, c.run_id()) for c in configs[2:]]
    assert executor.submitted == [[[str(rd.path.resolve()) for rd in todo]]]  # one task, both runs
    for rd in todo:
        st = rd.status()
        assert (st["state"], st["job_id"], st["log"]) == ("pending", "77_0", f"two/{rd.run_id}/run.log")
        assert st["stdout"] == "/logs/77_0.out"
    assert "submitted 2 run(s), 2 per task at once (1 array task(s)) as job array 77 (77_0 .. 77_0)" in \
        logged.read()
    queue.add("77_0")  # both runs are held by the one queued task: status and a relaunch see that
    assert launch(configs, store, LauncherConfig(name="slurm", runs_per_gpu=2)) == 0
    assert len(executor.submitted) == 1 and "4 runs: 1 finished, 3 queued" in logged.read()


def test_chunks_are_k_runs_in_order_the_last_one_shorter():
    from mmbalance.bench.launch.slurm import chunks

    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunks(list(range(4)), 4) == [[0, 1, 2, 3]] and chunks([7], 3) == [[7]]


def test_packed_checkpoint_stops_the_runs_marks_them_pending_and_requeues_the_chunk(tmp_path):
    import pickle
    import subprocess
    import sys

    from mmbalance.bench.launch.slurm import PackedSweepJob

    store = Store(tmp_path)
    running, done = store.run_dir("g", "joint-a"), store.run_dir("g", "joint-b")
    running.set_status("running", job_id="9_1", log="/x/run.log", epoch=1)
    done.set_status("finished", job_id="9_1")
    job = PackedSweepJob(cpus_per_task=4)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    job.procs[str(running.path)] = proc
    chunk = [str(running.path), str(done.path)]
    delayed = job.checkpoint(chunk)
    assert proc.poll() is not None  # stopped before the task goes: the requeued task resumes it
    assert delayed.function is job and delayed.args == (chunk,)
    st = running.status()
    assert (st["state"], st["job_id"], st["restarts"]) == ("pending", "9_1", 1) and "requeued" in st["note"]
    assert done.status()["state"] == "finished"
    again = pickle.loads(pickle.dumps(job))  # what submitit dumps for the requeued task: no processes
    assert again.cpus_per_task == 4 and again.procs == {}


HANDLER_SCRIPT = """
import os, signal, subprocess, sys, threading
from mmbalance.bench.launch.slurm import PackedSweepJob
from mmbalance.bench.store import RunDir

rd = RunDir(sys.argv[1])
rd.set_status("running", job_id="9_1")
job = PackedSweepJob(cpus_per_task=2)
proc = job.procs[str(rd.path)] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
signal.signal(signal.SIGUSR2, lambda *_: job.checkpoint([str(rd.path)]))
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR2)).start()
proc.wait()  # as PackedSweepJob.__call__ waits: the handler runs inside this wait
print("state", rd.status()["state"])
"""


def test_packed_checkpoint_stops_the_runs_from_the_handler_that_interrupted_the_wait_for_them(tmp_path):
    """submitit calls checkpoint() in its signal handler, while __call__ waits on a run-one
    process: stopping them must not wait on that same Popen (its lock is held), or the task hangs
    (here: the script does not end)."""
    import subprocess
    import sys

    rd = Store(tmp_path).run_dir("g", "joint-a")
    rd.path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, str(rd.path)], capture_output=True, text=True,
                          timeout=40)
    assert done.returncode == 0, done.stderr
    assert "state pending" in done.stdout and rd.status()["restarts"] == 1


def test_a_run_process_killed_by_a_signal_in_a_packed_task_is_interrupted_not_failed(tmp_path):
    from mmbalance.bench.launch.worker import record_exit

    store = Store(tmp_path)
    rd = store.run_dir("g", "joint-a")
    rd.set_status("running", job_id="9_1")
    assert record_exit(rd, -15, killed="interrupted") == "interrupted"
    assert "signal 15" in rd.status()["error"] and rd.status()["job_id"] == "9_1"
    other = store.run_dir("g", "joint-b")
    other.set_status("running")
    assert record_exit(other, 3, killed="interrupted") == "failed"
    assert record_exit(rd, 0) == "interrupted"  # what the run recorded itself stands


def test_packed_slurm_array_runs_each_chunk_together_through_submitit(tmp_path, logged):
    """submitit's debug executor runs each array task in this process: 2 runs, 2 per task, make
    one task, which trains both at once in run-one processes of their own."""
    store = Store(tmp_path / "results")
    _, configs = load_sweep(write(tmp_path, SWEEP.replace("seeds: [0, 1]", "seeds: [0]")))
    options = LauncherConfig(name="slurm", runs_per_gpu=2, cpus_per_task=2)
    code = launch(configs, store, options, wait=True, cluster="debug", poll_s=0)
    out = logged.read()
    assert code == 0 and "2 runs: 2 finished" in out, out
    assert "submitted 2 run(s), 2 per task at once (1 array task(s))" in out
    rds = [store.run_dir(c.group, c.run_id()) for c in configs]
    assert rds[0].status()["job_id"] == rds[1].status()["job_id"]  # they shared the task
    for rd in rds:
        st = rd.status()
        assert st["state"] == "finished" and rd.resolve(st["log"]) == rd.path / "run.log"
        assert f"finished: {rd.path}" in (rd.path / "run.log").read_text()  # its own process's output


# ---------------------------------------------------------------- the method's check, before anything starts

# MIE's stage lengths add up to 10 epochs, the sweep trains 2: MIE refuses it when it is built
BAD_MIE = SWEEP.replace("launcher:", "  mie-bad: {method: {name: mie, epoch_list: [5, 5]}}\nlauncher:")


def assert_one_line_naming_the_bad_cell(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run 'mie-bad' seed 0: method.epoch_list="), err
    assert "train.epochs" in lines[0]


@pytest.mark.parametrize("command", [
    ["sweep", "--launcher", "inline"], ["sweep", "--launcher", "local"], ["sweep", "--dry-run"],
    ["run", "--dry-run"], ["run"]], ids=" ".join)
def test_a_cell_the_method_rejects_stops_every_launcher_and_dry_run_before_anything_starts(tmp_path, capsys, command):
    root = tmp_path / "results"
    path = write(tmp_path, BAD_MIE)  # 3 cells x 2 seeds; the good cells come first
    assert cli(["-q", "--results", str(root), command[0], str(path), *command[1:]]) == 2  # -q: no progress lines
    assert_one_line_naming_the_bad_cell(capsys.readouterr().err)
    assert not root.exists()  # no run directory: nothing trained, nothing marked pending


def test_a_cell_the_method_rejects_is_not_submitted_to_slurm(slurm_world, capsys):
    configs, store, executor, _, _ = slurm_world
    path = write(store.root.parent, BAD_MIE, "bad.yaml")
    assert cli(["-q", "--results", str(store.root), "sweep", str(path), "--launcher", "slurm"]) == 2
    assert_one_line_naming_the_bad_cell(capsys.readouterr().err)
    assert executor.submitted == []
    for c in configs[2:]:  # the runs slurm_world left to do are as they were: no status, no config
        assert not store.run_dir(c.group, c.run_id()).path.exists()


def test_data_missing_here_stops_a_local_launch_but_not_a_submission_or_a_dry_run(slurm_world, capsys):
    """The check opens each dataset: where the runs would train here (inline, local) missing data
    stops the launch; a SLURM job may read disks this machine does not see, and a dry run needs
    no data, so they go on and say which cells were not checked."""
    configs, store, executor, _, _ = slurm_world
    nowhere = str(store.root.parent / "nowhere.npz")
    path = write(store.root.parent,
                 SWEEP.replace("dataset: {name: gaussian}", f"dataset: {{name: avdigits, cache: {nowhere}}}"),
                 "avdigits.yaml")
    _, runs = load_sweep(path)
    for launcher in ("local", "inline"):
        assert cli(["-q", "--results", str(store.root), "sweep", str(path), "--launcher", launcher]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: run 'joint' seed 0: dataset 'avdigits': cache file") and nowhere in err
        assert "\n" not in err and not any(store.run_dir(c.group, c.run_id()).path.exists() for c in runs)
    assert cli(["--results", str(store.root), "sweep", str(path), "--dry-run"]) == 0
    note = f"not checked here (no data): 2 cell(s) (joint, audio-only): dataset 'avdigits': cache file {nowhere!r}"
    assert note in capsys.readouterr().out
    assert cli(["--results", str(store.root), "sweep", str(path), "--launcher", "slurm"]) == 0
    assert f"warning: {note}" in capsys.readouterr().err and len(executor.submitted[0]) == 4


# ---------------------------------------------------------------- runs that join a running launch

FOLLOWED = """
group: follow
base:
  dataset: {name: gaussian}
  train: {epochs: 1, batch_size: 32, progress: false, tensorboard: false}
  optim: {lr: 0.05}
  eval: {probe: false}
seeds: [0, 1, 2]
cells:
  joint: {method: {name: joint}}
"""


def test_a_run_that_follows_an_ended_one_joins_the_inline_launch(tmp_path):
    """`follow` (a tuning study's next trial) on the inline launcher: the run it returns runs in
    the same launch, whose outcome covers it; a run already in the launch is not added again."""
    short, added, _ = load_sweep(write(tmp_path, FOLLOWED))[1]
    store = Store(tmp_path / "results")
    calls = []

    def follow(run_id: str) -> list:
        calls.append(run_id)
        return [added, short] if run_id == short.run_id() else []

    assert launch([short], store, LauncherConfig(name="inline"), wait=True, follow=follow) == 0
    assert calls == [short.run_id(), added.run_id()]
    assert all(store.run_dir(c.group, c.run_id()).done() for c in (short, added))


def test_a_run_that_follows_an_ended_one_starts_on_the_freed_worker_while_the_others_run(tmp_path, monkeypatch):
    """The local launcher with stand-in runs (no processes, no timing): of two workers, the short
    run's ends at once and `follow` adds a run; the long run waits until that run has started,
    which it can only do on the short run's freed worker while the long one still holds the other
    (a launcher that waited for the whole batch would leave it waiting)."""
    import threading

    from mmbalance.bench.launch import local
    from mmbalance.bench.launch.plan import plan

    short, long_run, added = load_sweep(write(tmp_path, FOLLOWED))[1]
    store = Store(tmp_path / "results")
    name = {c.run_id(): n for n, c in (("short", short), ("long", long_run), ("added", added))}
    added_started, events = threading.Event(), []

    def stand_in(p, slots, workers, gpus, runs_per_gpu, running):
        slot = slots.get()
        try:
            events.append(f"{name[p.run_dir.run_id]} starts")
            if name[p.run_dir.run_id] == "added":
                added_started.set()
            if name[p.run_dir.run_id] == "long":
                events.append(f"long saw added start: {added_started.wait(timeout=30)}")
        finally:
            slots.put(slot)
        return "finished", 0.0

    monkeypatch.setattr(local, "run_in_process", stand_in)
    states = local.launch_local(plan([short, long_run], store), LauncherConfig(name="local", workers=2),
                                lambda p: plan([added], store) if p.run_dir.run_id == short.run_id() else [])
    assert states == {c.run_id(): "finished" for c in (short, long_run, added)}
    assert "long saw added start: True" in events


def test_follow_is_refused_on_slurm(tmp_path):
    with pytest.raises(ValueError, match="inline or local launcher"):
        launch([], Store(tmp_path), LauncherConfig(name="slurm"), follow=lambda run_id: [])


# ---------------------------------------------------------------- Ctrl-C stops the local launcher

INTERRUPTIBLE = """
group: ctrlc
base:
  dataset: {name: gaussian}
  # 45 epochs (about 2 s here): the first run must still train when the launcher, loaded or not,
  # gets round to handling the Ctrl-C sent once the run reports `running`
  train: {epochs: 45, batch_size: 32, progress: false}
  optim: {lr: 0.05}
  eval: {probe: false}
seeds: [0, 1, 2]
cells:
  joint: {method: {name: joint}}
launcher: {name: local, workers: 1}
"""


def test_ctrl_c_stops_the_local_launcher_nothing_new_starts_and_a_relaunch_finishes(tmp_path, capsys):
    """A Ctrl-C at the terminal (SIGINT to the launcher's process group) while the first of three
    runs trains (one worker): the launcher interrupts that run, starts nothing else, says which
    runs did not start, leaves them as they were and exits 130 without a traceback."""
    import signal
    import subprocess
    import sys
    import time

    path = write(tmp_path, INTERRUPTIBLE)
    store = Store(tmp_path / "results")
    _, configs = load_sweep(path)
    first, *queued = [store.run_dir(c.group, c.run_id()) for c in configs]
    launcher = subprocess.Popen([sys.executable, "-m", "mmbalance", "--results", str(store.root), "sweep", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=as_at_a_terminal)
    deadline = time.monotonic() + 60
    while first.status()["state"] != "running":  # recorded once its model is built, before epoch 1
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and time.monotonic() - sent < 15
    assert "Traceback" not in out + err and err.strip().splitlines()[-1] == "interrupted", err
    assert f"warning: [1/3] interrupted joint seed 0 {first.run_id}" in err  # the launch's progress: stderr
    assert "warning: interrupted: 2 run(s) not started, left as they were" in err
    assert all(f"joint seed {i} {rd.run_id}" in err for i, rd in enumerate(queued, 1))
    assert first.status()["state"] == "interrupted"
    for rd in queued:  # never started, and no longer pending: as they were before the launch
        assert rd.status() == {"state": "new"} and not rd.metrics.exists() and not (rd.path / "run.log").exists()

    assert cli(["status", str(store.root / "ctrlc")]) == 0
    assert "0 running, 0 pending, 0 failed, 1 interrupted, 2 new" in capsys.readouterr().out
    assert cli(["--results", str(store.root), "sweep", str(path), "--launcher", "inline"]) == 0
    assert "3 runs: 3 finished" in capsys.readouterr().err
    assert all(len(rd.read_metrics()) == 45 for rd in [first, *queued])


def test_a_run_process_started_with_sigint_ignored_still_stops_on_sigint(fast_config, store):
    """A launcher started where SIGINT is ignored (a `&` job of a script, nohup) hands that on to
    its run processes; run-one takes SIGINT back, so the launcher's SIGINT still stops the run at
    an epoch's end, recorded interrupted, instead of after the grace period, killed."""
    import signal
    import subprocess
    import time

    from mmbalance.bench.launch.worker import run_one_command
    from mmbalance.core.errors import EXIT_INTERRUPTED

    cfg = fast_config("train.epochs=400")  # about 20 s: it would finish if the SIGINT were lost
    rd = store.run_dir(cfg.group, cfg.run_id())
    rd.write_config(cfg.to_dict())
    proc = subprocess.Popen(run_one_command(rd.path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not rd.metrics.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert rd.status()["state"] == "interrupted" and len(rd.read_metrics()) < 400


def test_a_run_process_interrupted_before_it_recorded_anything_is_interrupted(tmp_path):
    from mmbalance.bench.launch.worker import record_exit
    from mmbalance.core.errors import EXIT_INTERRUPTED

    rd = Store(tmp_path).run_dir("g", "joint-a")
    rd.set_status("pending")
    assert record_exit(rd, EXIT_INTERRUPTED) == "interrupted" and "SIGINT" in rd.status()["error"]


def test_ctrl_c_while_the_runs_are_being_marked_pending_puts_every_status_back(tmp_path, monkeypatch, logged):
    from mmbalance.bench.launch import local
    from mmbalance.bench.launch.plan import plan

    store = Store(tmp_path / "results")
    _, configs = load_sweep(write(tmp_path, SWEEP))
    earlier = store.run_dir(configs[0].group, configs[0].run_id())
    earlier.set_status("interrupted", error="from an earlier launch")
    before = earlier.status_file.read_text()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "placement_line", interrupt)  # after every run is marked pending
    with pytest.raises(KeyboardInterrupt):
        local.launch_local(plan(configs, store), LauncherConfig(name="local", workers=1))
    assert earlier.status_file.read_text() == before
    for c in configs[1:]:
        rd = store.run_dir(c.group, c.run_id())
        assert not rd.status_file.exists() and not (rd.path / "run.log").exists()
    assert "interrupted: 4 run(s) not started, left as they were" in logged.read()


def test_a_run_that_ignores_the_interrupt_is_killed_after_the_grace_period():
    import subprocess
    import sys

    from mmbalance.bench.launch.local import Workers, stop_running

    running = Workers()
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                                 "signal.signal(signal.SIGINT, signal.SIG_IGN); print(flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE)
    stubborn.stdout.readline()  # its handler is in place
    running.procs["joint-a"] = stubborn
    stop_running(running, grace_s=0.5)
    assert stubborn.wait(5) == -9 and running.stopped
