"""Sweeps on a real SLURM cluster (`-m slurm`; `make test-slurm`).

They need a running cluster and `SLURM_CONF` in the environment: `bash scripts/slurm-local.sh start`
brings up a single-node one on this machine and prints the export (.ci/run does both). Without
one they are skipped, unless MMBALANCE_REQUIRE_SLURM=1 (CI), where they fail instead.

Every run goes through the CLI (`mmbalance sweep FILE --launcher slurm`) in a subprocess, as a
user would launch it; every wait has a deadline, so a broken cluster fails a test, never hangs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmbalance.bench.store import RunDir
from tests.conftest import TIMING_KEYS, without_timing

pytestmark = pytest.mark.slurm

# submitit counts a USR2 as a time-out (not a pre-emption) when the limit is 10 minutes or less
TIME_MIN = 60
RUN_DEADLINE_S = 300  # for any sweep here to end; they take well under a minute on 2 cores
# wall-clock and memory figures differ between identical runs; so do the checkpoint writes (their
# seconds, and their count: a run resumed after preemption writes its own as well)
COST_TIMING_KEYS = ("seconds_per_epoch", "samples_per_s", "peak_rss_mb", "peak_gpu_mem_mb", "checkpoints",
                    "checkpoint_s")


# ------------------------------------------------------------------------------------ cluster


def cluster_partition() -> str:
    """The cluster's default partition (or skip/fail when there is no cluster to talk to)."""
    required = os.environ.get("MMBALANCE_REQUIRE_SLURM") == "1"
    give_up = pytest.fail if required else pytest.skip
    if not os.environ.get("SLURM_CONF"):
        give_up("SLURM_CONF is not set: start a cluster with `bash scripts/slurm-local.sh start` and export "
                "the SLURM_CONF it prints")
    if shutil.which("sinfo") is None:
        give_up("sinfo is not installed (scripts/slurm-local.sh start installs SLURM)")
    done = subprocess.run(["sinfo", "--noheader", "--format=%P %a"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        give_up(f"sinfo failed (SLURM_CONF={os.environ['SLURM_CONF']}): {done.stderr.strip()}")
    partitions = [line.split() for line in done.stdout.splitlines() if line.strip()]
    up = [name for name, avail in partitions if avail == "up"]
    if not up:
        give_up(f"no partition is up: {done.stdout.strip()!r}")
    default = [name for name in up if name.endswith("*")]
    return (default or up)[0].rstrip("*")


@pytest.fixture(scope="module")
def partition() -> str:
    return cluster_partition()


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy (returned); fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------ sweeps


def write_sweep(path: Path, group: str, partition: str, **sections: Any) -> Path:
    """A sweep file on the Gaussian dataset (small MLPs) with the slurm launcher."""
    base = {
        "dataset": {"name": "gaussian"},
        "train": {"epochs": 3, "batch_size": 32, "progress": False},
        "optim": {"lr": 0.05},
        "eval": {"probe_c_grid": [0.1, 1.0]},
    }
    for key, value in sections.pop("base", {}).items():
        base[key] = {**base.get(key, {}), **value}
    sweep = {
        "group": group,
        "base": base,
        "seeds": [0],
        "launcher": {"name": "slurm", "partition": partition, "time_min": TIME_MIN, "cpus_per_task": 1},
        **sections,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def mmbalance(root: Path, *args: str, timeout_s: float = RUN_DEADLINE_S) -> subprocess.CompletedProcess:
    """`mmbalance --results ROOT ARGS` in a subprocess (the environment, SLURM_CONF included, is
    passed on: submitit runs sbatch/sacct from it). Its output is echoed for the test log."""
    cmd = [sys.executable, "-m", "mmbalance", "--results", str(root), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=root.parent)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`mmbalance {' '.join(args)}` still running after {timeout_s:.0f} s; output so far:\n"
                    f"{e.stdout}\n{e.stderr}")
    print(f"$ mmbalance {' '.join(args)}  (exit {done.returncode})\n{done.stdout}{done.stderr}")
    return done


def runs_of(root: Path, group: str) -> list[RunDir]:
    return [RunDir(p.parent) for p in sorted((root / group).glob("*/config.yaml"))]


def unfinished_job_ids(root: Path) -> set[str]:
    """The SLURM job ids recorded for runs under `root` that are still pending or running."""
    ids = set()
    for path in root.glob("*/*/status.json"):
        status = json.loads(path.read_text())
        if status.get("job_id") and status["state"] in ("pending", "running"):
            ids.add(str(status["job_id"]))
    return ids


def cancel_leftovers(root: Path) -> None:
    """scancel the jobs of unfinished runs under `root` (a failed test must not leave them on the cluster)."""
    ids = unfinished_job_ids(root)
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True, timeout=60)


@pytest.fixture
def results(tmp_path) -> Iterator[Path]:
    root = tmp_path / "results"
    root.mkdir()
    yield root
    cancel_leftovers(root)


def sacct(*args: str) -> list[str]:
    out = subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", *args],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def jobs_named_like(job: str, since: str) -> int:
    """How many jobs (each array task counted) named as `job` the cluster has accepted since
    `since` (other users of the cluster may submit meanwhile: their jobs do not count)."""
    name = sacct(f"--jobs={job}", "--format=JobName")[0]
    return len(sacct(f"--name={name}", f"--starttime={since}", "--format=JobID"))


def comparable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json minus the cost figures that differ between identical runs (COST_TIMING_KEYS)."""
    cost = {k: v for k, v in summary["cost"].items() if k not in COST_TIMING_KEYS}
    return {**summary, "cost": cost}


# ------------------------------------------------------------------------------------ (a) + (d)


@pytest.fixture(scope="module")
def finished_sweep(partition, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A 2-method x 2-seed sweep launched with --wait; how long it took from the command to all-done."""
    tmp = tmp_path_factory.mktemp("sweep")
    root = tmp / "results"
    root.mkdir()
    path = write_sweep(tmp / "methods.yaml", "slurm-methods", partition, seeds=[0, 1],
                       grid={"method.name": ["joint", "mla"]})
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    start = time.perf_counter()
    done = mmbalance(root, "sweep", str(path), "--launcher", "slurm", "--wait")
    seconds = time.perf_counter() - start
    print(f"\n4-run sweep on SLURM: {seconds:.1f} s from `mmbalance sweep --wait` to all done")
    yield {"root": root, "path": path, "done": done, "seconds": seconds, "since": since}
    cancel_leftovers(root)


def test_sweep_runs_every_run_through_slurm(finished_sweep):
    root, done = finished_sweep["root"], finished_sweep["done"]
    assert done.returncode == 0, done.stderr
    runs = runs_of(root, "slurm-methods")
    assert len(runs) == 4
    configs = [rd.read_config() for rd in runs]
    assert sorted((c["method"]["name"], c["train"]["seed"]) for c in configs) == [
        ("joint", 0), ("joint", 1), ("mla", 0), ("mla", 1)]
    for rd in runs:
        status = rd.status()
        assert status["state"] == "finished", (rd.path, status)
        assert status.get("job_id"), status  # it ran as a SLURM job, not in this process
        assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2]
        summary = rd.read_summary()
        assert summary is not None and 0.0 <= summary["best_val"]["val"]["acc"] <= 1.0
    # one array job for the launch: every run's job id is <array>_<index> of the same array
    arrays = {str(rd.status()["job_id"]).split("_")[0] for rd in runs}
    assert len(arrays) == 1, arrays


def test_relaunching_a_finished_sweep_submits_nothing(finished_sweep):
    root, path = finished_sweep["root"], finished_sweep["path"]
    first_job = str(runs_of(root, "slurm-methods")[0].status()["job_id"])
    before_jobs = jobs_named_like(first_job, finished_sweep["since"])
    submissions = sorted(p.name for p in (root / "slurm-methods" / ".submitit").iterdir())
    before_status = {rd.run_id: rd.status_file.read_text() for rd in runs_of(root, "slurm-methods")}
    done = mmbalance(root, "sweep", str(path), "--launcher", "slurm", "--wait", timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert "4 finished" in done.stderr  # the launch's summary, with its progress on stderr
    assert before_jobs == 4
    assert jobs_named_like(first_job, finished_sweep["since"]) == before_jobs
    assert sorted(p.name for p in (root / "slurm-methods" / ".submitit").iterdir()) == submissions
    after_status = {rd.run_id: rd.status_file.read_text() for rd in runs_of(root, "slurm-methods")}
    assert after_status == before_status  # nothing was even marked pending
    dry = mmbalance(root, "sweep", str(path), "--dry-run", timeout_s=120)
    assert dry.returncode == 0 and "4 finished" in dry.stdout


# ------------------------------------------------------------------------------------ (b) pre-emption

# 20,000 training samples: about 0.7 s per epoch on one core, so 16 epochs leave ample time to
# signal the job after its second epoch and before its last
PREEMPT_BASE = {"dataset": {"name": "gaussian", "n_train": 20000}, "train": {"epochs": 16}}


def only_run(root: Path, group: str) -> RunDir | None:
    runs = runs_of(root, group)
    return runs[0] if len(runs) == 1 else None


def test_preempted_run_requeues_resumes_and_matches_an_uninterrupted_run(partition, results, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    path = write_sweep(tmp_path / "preempt.yaml", "slurm-preempt", partition, base=PREEMPT_BASE,
                       cells={"joint": {"method.name": "joint"}})
    try:
        # the same run twice, in two stores: one is signalled, the other runs through
        for root in (results, reference):
            assert mmbalance(root, "sweep", str(path), "--launcher", "slurm", timeout_s=120).returncode == 0
        rd = wait_until(lambda: only_run(results, "slurm-preempt"), 60, "the run directory")
        wait_until(lambda: len(rd.read_metrics()) >= 2, 120, "two epochs of the run to be recorded")
        before = rd.read_metrics()
        status = rd.status()
        assert status["state"] == "running", f"the run is not mid-run when signalled: {status}"
        job = str(status["job_id"])

        # what SLURM sends before pre-empting a job (submitit's handler checkpoints and requeues)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
        signalled = time.perf_counter()
        seen: list[dict[str, Any]] = []

        def finished() -> bool:
            current = rd.status()
            if not seen or current != seen[-1]:
                seen.append(current)
            return current["state"] in ("finished", "failed")

        wait_until(finished, RUN_DEADLINE_S, "the requeued run to finish")
        print(f"signalled after epoch {before[-1]['epoch']}; states since: {[s['state'] for s in seen]}; "
              f"finished {time.perf_counter() - signalled:.1f} s after the signal")
        ref = wait_until(lambda: only_run(reference, "slurm-preempt"), 60, "the reference run directory")
        wait_until(lambda: ref.status()["state"] in ("finished", "failed"), RUN_DEADLINE_S, "the reference run")
    finally:
        cancel_leftovers(reference)

    states = [s["state"] for s in seen]
    assert states[-1] == "finished", seen[-1]
    # the status recorded the requeue: pending again after it had been running, same job id
    assert "pending" in states, states
    assert "running" in states[states.index("pending"):], states
    assert str(rd.status()["job_id"]) == job
    assert rd.status()["restarts"] == 1  # the finished run still says it was requeued once
    states_in_sacct = sacct("--duplicates", f"--jobs={job}", "--format=State")
    assert any(s.startswith("REQUEUED") for s in states_in_sacct), states_in_sacct

    after = rd.read_metrics()
    epochs = [r["epoch"] for r in after]
    assert epochs == list(range(16)), epochs  # every epoch once: nothing repeated, nothing lost
    # resumed, not restarted: epochs checkpointed before the signal kept their records, timing included
    assert after[0] == before[0]
    assert without_timing(after) == without_timing(ref.read_metrics())
    assert comparable_summary(rd.read_summary()) == comparable_summary(ref.read_summary())
    assert set(TIMING_KEYS) <= set(after[-1]["train"])


# ------------------------------------------------------------------------------------ (c) failure


def test_a_failing_run_is_marked_failed_with_its_traceback_while_the_others_finish(partition, results, tmp_path):
    # lr 1e30 makes the loss non-finite on the second batch: the job raises mid-training
    path = write_sweep(tmp_path / "failing.yaml", "slurm-failing", partition, cells={
        "joint": {"method.name": "joint"},
        "mla": {"method.name": "mla"},
        "diverges": {"method.name": "joint", "optim.lr": 1.0e30},
    })
    done = mmbalance(results, "sweep", str(path), "--launcher", "slurm", "--wait")
    assert done.returncode == 1, "a sweep with a failed run must not exit 0"
    runs = {rd.read_config()["label"]: rd for rd in runs_of(results, "slurm-failing")}
    assert sorted(runs) == ["diverges", "joint", "mla"]
    assert runs["joint"].status()["state"] == "finished"
    assert runs["mla"].status()["state"] == "finished"
    failed = runs["diverges"].status()
    assert failed["state"] == "failed", failed
    assert "nan" in failed["error"] or "inf" in failed["error"], failed["error"]
    assert "\n" not in failed["error"]  # the first line; the whole story is the traceback
    assert failed["traceback"].startswith("Traceback (most recent call last)")
    assert "NonFiniteLoss" in failed["traceback"]
    assert failed.get("job_id") and failed.get("log")
    log = runs["diverges"].resolve(failed["log"])
    assert not Path(failed["log"]).is_absolute() and log.exists()  # relative to the store
    assert failed["error"] in done.stderr  # the --wait summary names the failure

    status = mmbalance(results, "status", str(results / "slurm-failing"), timeout_s=120)
    assert status.returncode == 0
    assert failed["error"] in status.stdout and str(log) in status.stdout
    assert str(failed["job_id"]) in status.stdout


# ------------------------------------------------------------------------------------ (e) packing


def packed_launcher(partition: str, k: int = 2) -> dict[str, Any]:
    """K runs per array task, sharing the task's 2 CPUs (one thread each)."""
    return {"name": "slurm", "partition": partition, "time_min": TIME_MIN, "cpus_per_task": 2, "runs_per_gpu": k}


def test_a_packed_sweep_runs_k_runs_per_array_task(partition, results, tmp_path):
    path = write_sweep(tmp_path / "packed.yaml", "slurm-packed", partition, seeds=[0, 1, 2],
                       cells={"joint": {"method.name": "joint"}}, launcher=packed_launcher(partition))
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    done = mmbalance(results, "sweep", str(path), "--wait")
    assert done.returncode == 0, done.stderr
    assert "submitted 3 run(s), 2 per task at once (2 array task(s))" in done.stderr
    runs = runs_of(results, "slurm-packed")
    assert len(runs) == 3
    jobs: dict[str, list[RunDir]] = {}
    for rd in runs:
        status = rd.status()
        assert status["state"] == "finished", (rd.path, status)
        assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2]
        assert rd.resolve(status["log"]) == rd.path / "run.log" and "finished:" in (rd.path / "run.log").read_text()
        assert rd.resolve(status["stdout"]).exists()  # the task's own output
        jobs.setdefault(str(status["job_id"]), []).append(rd)
    assert sorted(len(v) for v in jobs.values()) == [1, 2]  # 3 runs, 2 per task: 2 tasks
    assert len({job.split("_")[0] for job in jobs}) == 1  # of one array
    assert jobs_named_like(next(iter(jobs)), since) == 2  # SLURM ran 2 tasks, not 3
    status = mmbalance(results, "status", str(results / "slurm-packed"), timeout_s=120)
    assert status.returncode == 0 and "3 runs: 3 finished" in status.stdout


def test_a_preempted_packed_task_requeues_and_resumes_both_of_its_runs(partition, results, tmp_path):
    path = write_sweep(tmp_path / "packed-preempt.yaml", "slurm-packed-preempt", partition, base=PREEMPT_BASE,
                       seeds=[0, 1], cells={"joint": {"method.name": "joint"}}, launcher=packed_launcher(partition))
    assert mmbalance(results, "sweep", str(path), timeout_s=120).returncode == 0
    runs = wait_until(lambda: (r := runs_of(results, "slurm-packed-preempt")) and len(r) == 2 and r, 60,
                      "the two run directories")
    wait_until(lambda: all(len(rd.read_metrics()) >= 2 for rd in runs), 180, "two epochs of both runs")
    job = str(runs[0].status()["job_id"])
    assert str(runs[1].status()["job_id"]) == job  # one task runs both
    assert all(rd.status()["state"] == "running" for rd in runs), [rd.status() for rd in runs]
    before = [rd.read_metrics() for rd in runs]

    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    wait_until(lambda: all(rd.status().get("restarts") == 1 for rd in runs), 60, "both runs marked requeued")
    wait_until(lambda: all(rd.status()["state"] in ("finished", "failed") for rd in runs), RUN_DEADLINE_S,
               "both requeued runs to finish")
    for rd, earlier in zip(runs, before):
        status = rd.status()
        assert status["state"] == "finished" and status["restarts"] == 1 and str(status["job_id"]) == job, status
        after = rd.read_metrics()
        assert [r["epoch"] for r in after] == list(range(16))  # every epoch once: resumed, not restarted
        assert after[0] == earlier[0]
    assert any(s.startswith("REQUEUED") for s in sacct("--duplicates", f"--jobs={job}", "--format=State"))


# ------------------------------------------------------------------------------------ (f) cancel, requeue


def started_run(root: Path, path: Path, group: str) -> tuple[RunDir, str, int]:
    """Launch the one-run sweep `path`; once two epochs are recorded: its run, job id and epochs so far."""
    assert mmbalance(root, "sweep", str(path), timeout_s=120).returncode == 0
    rd = wait_until(lambda: only_run(root, group), 60, "the run directory")
    wait_until(lambda: len(rd.read_metrics()) >= 2, 120, "two epochs of the run to be recorded")
    status = rd.status()
    assert status["state"] == "running", f"the run is not mid-run: {status}"
    return rd, str(status["job_id"]), len(rd.read_metrics())


def job_gone(job: str) -> bool:
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60, check=True)
    return job not in done.stdout.split()


def test_cancel_while_the_job_still_writes_ends_interrupted_and_a_relaunch_resumes(partition, results, tmp_path):
    """scancel gives the job SIGTERM, which submitit's handler lets pass: the job trains on until
    SLURM kills it (KillWait later), and its end-of-epoch write must not put `running` back."""
    path = write_sweep(tmp_path / "cancel.yaml", "slurm-cancel", partition, base=PREEMPT_BASE,
                       cells={"joint": {"method.name": "joint"}})
    rd, job, epochs = started_run(results, path, "slurm-cancel")
    done = mmbalance(results, "cancel", str(results / "slurm-cancel"), timeout_s=120)
    assert done.returncode == 0 and f"cancelled 1 job(s): {job}" in done.stdout
    at_cancel = len(rd.read_metrics())
    seen = []

    def gone_and_settled() -> bool:
        seen.append(rd.status()["state"])
        return job_gone(job)

    wait_until(gone_and_settled, 120, f"job {job} to leave the queue")
    status = rd.status()
    print(f"cancel started after {epochs} epochs, returned after {at_cancel}; states since: {sorted(set(seen))}; "
          f"epochs recorded when the job was gone: {len(rd.read_metrics())}; error: {status.get('error')}")
    assert set(seen) == {"interrupted"}, seen  # never `running` again, while the job lived on
    assert status["state"] == "interrupted" and status["error"] == f"job {job} cancelled (mmbalance cancel)"
    recorded = [r["epoch"] for r in rd.read_metrics()]
    assert recorded == list(range(len(recorded))) and len(recorded) < 16
    assert len(recorded) <= at_cancel + 1  # it stopped at the end of the epoch it was in, not at SIGKILL
    assert rd.load(rd.checkpoint)["epoch"] == recorded[-1]  # stopped at an epoch end, checkpoint kept

    again = mmbalance(results, "sweep", str(path), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 will resume" in again.stderr
    assert rd.status()["state"] == "finished"
    assert [r["epoch"] for r in rd.read_metrics()] == list(range(16))


def test_a_requeue_by_scontrol_counts_as_a_restart_and_the_run_resumes(partition, results, tmp_path):
    path = write_sweep(tmp_path / "requeue.yaml", "slurm-requeue", partition, base=PREEMPT_BASE,
                       cells={"joint": {"method.name": "joint"}})
    rd, job, epochs = started_run(results, path, "slurm-requeue")
    before = rd.read_metrics()
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    wait_until(lambda: rd.status()["state"] in ("finished", "failed"), RUN_DEADLINE_S, "the requeued run to finish")
    status = rd.status()
    print(f"requeued after {epochs} epochs: {status}")
    assert status["state"] == "finished" and str(status["job_id"]) == job, status
    assert status["restarts"] == 1, status
    assert any(s.startswith("REQUEUED") for s in sacct("--duplicates", f"--jobs={job}", "--format=State"))
    after = rd.read_metrics()
    assert [r["epoch"] for r in after] == list(range(16))  # every epoch once: resumed, not restarted
    assert after[0] == before[0]


def test_a_run_that_needs_teachers_is_submitted_after_them_with_a_dependency(partition, results, tmp_path):
    """A sweep of only UMT runs: its unimodal teachers go in a first array, UMT in a second one
    submitted with an afterany dependency on the first; UMT finds them finished and trains."""
    path = write_sweep(tmp_path / "umt.yaml", "slurm-umt", partition, cells={"umt": {"method": {"name": "umt"}}})
    done = mmbalance(results, "sweep", str(path), "--launcher", "slurm", "--wait")
    assert done.returncode == 0, done.stderr
    by_method: dict[str, list[RunDir]] = {}
    for rd in runs_of(results, "slurm-umt"):
        by_method.setdefault(rd.read_config()["method"]["name"], []).append(rd)
    teachers, (umt,) = by_method["unimodal"], by_method["umt"]
    assert len(teachers) == 2 and all(rd.status()["state"] == "finished" for rd in teachers)
    assert umt.status()["state"] == "finished", umt.status()
    first = {str(rd.status()["job_id"]).split("_")[0] for rd in teachers}
    second = str(umt.status()["job_id"]).split("_")[0]
    assert len(first) == 1 and second not in first
    assert f"after job(s) {first.pop()}" in done.stderr + done.stdout  # submitted with the dependency


def test_tuning_trials_run_as_slurm_array_tasks_and_report_to_their_study(partition, results, tmp_path):
    """`mmbalance tune --launcher slurm`: each round of trials is a job array whose tasks report
    validation to the study's journal file; the budget is spent exactly, then the defaults and
    the tuned cell run as jobs too."""
    root = results
    path = write_sweep(tmp_path / "tune.yaml", "slurm-tune", partition, cells={"ogm-ge": {"method.name": "ogm_ge"}},
                       tune={"trials": 3, "parallel": 2, "startup_trials": 1, "warmup_epochs": 0},
                       base={"eval": {"probe": False}})
    done = mmbalance(root, "tune", str(path))
    assert done.returncode == 0, done.stderr
    record = json.loads((root / "slurm-tune" / "tuning" / "ogm-ge.json").read_text())
    assert len(record["trials"]) == 3 and set(record["chosen"]) == {"alpha", "optim.lr"}
    trial_runs = runs_of(root / "slurm-tune" / "tuning", "ogm-ge")
    assert len(trial_runs) == 3
    arrays = {str(rd.status()["job_id"]).split("_")[0] for rd in trial_runs}
    assert len(arrays) == 2, arrays  # two rounds: trials 0-1 together, then trial 2
    assert all(rd.read_config()["trial"]["number"] in (0, 1, 2) for rd in trial_runs)
    assert {rd.status()["state"] for rd in trial_runs} <= {"finished", "pruned"}
    for rd in runs_of(root, "slurm-tune"):  # the default and the tuned run, each a job
        assert rd.status()["state"] == "finished" and rd.status().get("job_id"), rd.path
    assert sorted(rd.read_config()["label"] for rd in runs_of(root, "slurm-tune")) == ["ogm-ge", "ogm-ge-tuned"]
