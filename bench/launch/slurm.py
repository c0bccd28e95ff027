"""The SLURM launcher: one submitit job array per launch, one array task per run, or, with
runs_per_gpu K > 1, per chunk of K runs that share the task's GPU and CPUs.

Each task runs `SweepJob` (one run, in the task's process) or `PackedSweepJob` (K runs, each in a
`python -m mmbalance run-one` process of its own), submitit Checkpointables: on a time-out or
pre-emption submitit calls their `checkpoint()`, which marks the unfinished runs pending and
requeues the same call; the requeued task skips finished runs and resumes started ones from
their checkpoint.pt (bench.train.run resumes unfinished runs). Runs that are finished or still
queued are never submitted (bench.launch.plan decides).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import submitit

from mmbalance.bench.claim import elsewhere_line
from mmbalance.bench.launch import jobs as slurm_queue
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import ENDED, PlannedRun
from mmbalance.bench.launch.worker import (
    mark_pending,
    place_claimed,
    record_exit,
    restore_status,
    run_one,
    run_one_command,
    saved_status,
)
from mmbalance.bench.logs import child_level, to_stderr
from mmbalance.bench.store import RunDir
from mmbalance.core.errors import MMBalanceError, RunFailed

log = logging.getLogger(__name__)


class SweepJob(submitit.helpers.Checkpointable):
    """What an array task runs: one run directory, trained (or resumed) to the end. The task's
    process is one the suite starts: its log records go to the task's stderr, at `log_level`
    (the launching process's: see bench.logs.child_level)."""

    def __init__(self, log_level: int = logging.INFO) -> None:
        self.log_level = log_level

    def __call__(self, run_dir: str) -> str:
        with to_stderr(self.log_level):
            return run_one(run_dir, **placement())

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission:
        mark_requeued(RunDir(Path(run_dir)))
        return super().checkpoint(run_dir)


class PackedSweepJob(submitit.helpers.Checkpointable):
    """What an array task runs with K > 1: its chunk of run directories, all at once, each in a
    `python -m mmbalance run-one` process with cpus_per_task // K cores (OMP_NUM_THREADS: the share
    the thread policy, bench.threads, gives a GPU run), sharing the task's GPU.
    Each run's status gets the task's job id (so that status, cancel and the summary find it),
    `log` its own run.log (where its process writes) and `stdout` the task's output."""

    def __init__(self, cpus_per_task: int = 1, log_level: int = logging.INFO) -> None:
        self.cpus_per_task, self.log_level = cpus_per_task, log_level
        self.procs: dict[str, subprocess.Popen] = {}  # live run-one processes; never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {"cpus_per_task": self.cpus_per_task, "log_level": self.log_level}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __call__(self, run_dirs: list[str]) -> dict[str, str]:
        with to_stderr(self.log_level):  # as SweepJob's
            return self.run_chunk(run_dirs)

    def run_chunk(self, run_dirs: list[str]) -> dict[str, str]:
        where = placement()
        todo = [RunDir(Path(d)) for d in run_dirs]
        todo = [rd for rd in todo if not rd.done()]
        threads = str(max(1, self.cpus_per_task // max(len(run_dirs), 1)))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        log.info(f"task {where['job_id']}: {len(todo)} of {len(run_dirs)} run(s) to do at once, "
                 f"{threads} core(s) each (their threads: the thread policy, in each run's log)")
        states = {}
        for rd in todo:
            if not place_claimed(rd, job_id=where["job_id"], log=str(rd.path / "run.log"),
                                 **({"stdout": where["stdout"]} if "stdout" in where else {})):
                states[str(rd.path)] = "elsewhere"  # another process trains it: left alone
                log.info(f"task {where['job_id']}: {rd.path}: {elsewhere_line(rd)}")
                continue
            with open(rd.path / "run.log", "ab") as run_log:
                self.procs[str(rd.path)] = subprocess.Popen(
                    run_one_command(rd.path), stdout=run_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, preexec_fn=ignore_preemption)
        for rd in todo:
            if str(rd.path) not in self.procs:
                continue
            code = self.procs[str(rd.path)].wait()
            states[str(rd.path)] = record_exit(rd, code, killed="interrupted")
            log.log(logging.INFO if states[str(rd.path)] in (*ENDED, "elsewhere") else logging.WARNING,
                    f"task {where['job_id']}: {states[str(rd.path)]} {rd.path}")
        failed = [f"{Path(d).name} ({state})" for d, state in states.items() if state not in (*ENDED, "elsewhere")]
        if failed:  # the task fails as a one-run task would; each run's status says why
            raise RunFailed(f"{len(failed)} of {len(todo)} run(s) of this task did not finish: {', '.join(failed)}")
        return states

    def checkpoint(self, run_dirs: list[str]) -> submitit.helpers.DelayedSubmission:
        """Stop the chunk's processes (the requeued task resumes them from their last
        checkpoint.pt), mark its unfinished runs pending, requeue the same chunk."""
        stop(list(self.procs.values()))
        for run_dir in run_dirs:
            mark_requeued(RunDir(Path(run_dir)))
        return super().checkpoint(run_dirs)


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the processes, SIGKILL those alive after `grace_s`, reap them all. By pid, not
    Popen.wait: this runs in the signal handler that interrupted __call__'s Popen.wait, which
    holds that Popen's lock (waiting on it here would deadlock)."""
    for proc in procs:
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        while True:
            try:
                if os.waitpid(proc.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # reaped already
                break
            if time.monotonic() > deadline:
                with suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
                break
            time.sleep(0.05)


def ignore_preemption() -> None:
    """In a packed task's run-one processes: SLURM signals every process of the task before a
    time-out or pre-emption; only the task's own handler (checkpoint above) acts on it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def mark_requeued(rd: RunDir) -> None:
    status = rd.status()
    if status["state"] != "finished":
        rd.set_status("pending", note="requeued after a time-out or pre-emption; resumes from its checkpoint",
                      restarts=int(status.get("restarts", 0)) + 1)


def placement() -> dict[str, str]:
    """This task's job id and log files, as submitit's job environment knows them."""
    env = submitit.JobEnvironment()
    try:
        return {"job_id": str(env.job_id), "log": str(env.paths.stderr), "stdout": str(env.paths.stdout)}
    except KeyError:  # submitit's in-process debug executor has no job folder
        return {"job_id": str(env.job_id)}


def make_executor(folder: Path, options: LauncherConfig, name: str, cluster: str | None = None,
                  after: Sequence[str] = ()) -> submitit.Executor:
    """An AutoExecutor (SLURM where sbatch exists; `cluster` picks another, e.g. 'local' in
    tests) with the sweep's sbatch options. OMP_NUM_THREADS follows the CPUs given: SLURM
    without CPU binding would otherwise let torch use every core of the node. `after`: job ids
    its jobs start after (ended in any state: a run whose requirement failed fails naming it),
    with any dependency the sweep's sbatch_extra gives."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=options.max_requeues)
    optional = {"slurm_partition": options.partition, "slurm_account": options.account,
                "slurm_qos": options.qos, "slurm_gpus_per_task": options.gpus_per_task or None,
                "slurm_constraint": options.constraint, "mem_gb": options.mem_gb}
    executor.update_parameters(
        name=name,
        timeout_min=options.time_min,
        cpus_per_task=options.cpus_per_task,
        slurm_array_parallelism=options.array_parallelism,
        slurm_setup=["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"],
        slurm_additional_parameters=with_dependency(dict(options.sbatch_extra), after),
        **{k: v for k, v in optional.items() if v is not None},
    )
    return executor


def with_dependency(sbatch: dict[str, Any], after: Sequence[str]) -> dict[str, Any]:
    """sbatch options with `--dependency=afterany:<ids>` added (to the sweep's own, if any: both hold)."""
    if not after:
        return sbatch
    wanted = "afterany:" + ":".join(after)
    return {**sbatch, "dependency": f"{sbatch['dependency']},{wanted}" if sbatch.get("dependency") else wanted}


def chunks(todo: Sequence[PlannedRun], k: int) -> list[list[PlannedRun]]:
    """The runs in array-task order, K at a time (the last chunk may be shorter)."""
    return [list(todo[i:i + k]) for i in range(0, len(todo), k)]


def submit(todo: Sequence[PlannedRun], executor: submitit.Executor, runs_per_task: int = 1,
           cpus_per_task: int = 1) -> list[submitit.Job]:
    """Submit one array task per run (runs_per_task 1: SweepJob, whose log is the task's stderr)
    or per chunk of runs_per_task runs (PackedSweepJob, each run logging to its run.log); each
    run's status becomes pending with its task's job id and logs. Returns the tasks' jobs. If
    the submission fails, the runs' previous status files are put back."""
    if not todo:
        return []
    previous = {p.run_dir.path: saved_status(p.run_dir) for p in todo}
    # a run taken or finished by another launch since this one planned is not submitted
    todo = [p for p in todo
            if mark_pending(p.run_dir, p.cfg.to_dict(), job_id=None, log=None, stdout=None) == "pending"]
    if not todo:
        return []
    groups = chunks(todo, runs_per_task)
    paths = [[str(p.run_dir.path.resolve()) for p in group] for group in groups]
    try:
        if runs_per_task == 1:
            jobs = executor.map_array(SweepJob(child_level()), [chunk[0] for chunk in paths])
        else:
            jobs = executor.map_array(PackedSweepJob(cpus_per_task, child_level()), paths)
    except BaseException as e:
        for p in todo:
            restore_status(p.run_dir, previous[p.run_dir.path])
        if isinstance(e, submitit.core.utils.FailedJobError):  # sbatch refused: say why in one line
            raise SubmitFailed(f"sbatch failed: {first_line(str(e))}; nothing was submitted, the runs are as "
                               "they were (is SLURM up? try `sinfo`)") from None
        raise
    for group, job in zip(groups, jobs):
        for p in group:
            run_log = job.paths.stderr if runs_per_task == 1 else p.run_dir.path / "run.log"
            if p.run_dir.status()["state"] == "pending":  # the task may already have started
                p.run_dir.set_status("pending", job_id=str(job.job_id), log=str(run_log), stdout=str(job.paths.stdout))
    return jobs


class SubmitFailed(MMBalanceError):
    """sbatch refused the job array (SLURM not answering, a bad partition or account)."""


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def still_alive(jobs: Sequence[submitit.Job]) -> list[submitit.Job]:
    """The jobs still queued or running: by squeue for SLURM jobs (no sacct needed, so this also
    works without accounting; a requeued task counts as queued), else submitit's own check."""
    if jobs and isinstance(jobs[0], submitit.SlurmJob):
        queued = slurm_queue.queued_job_ids()
        if queued is not None:
            return [job for job in jobs if str(job.job_id) in queued]
    return [job for job in jobs if not job.done()]


def wait(jobs: Sequence[submitit.Job], poll_s: float = 5.0, on_poll: Callable[[int], Any] | None = None) -> None:
    """Block until none of `jobs` is queued or running."""
    while True:
        left = len(still_alive(jobs))
        if on_poll:
            on_poll(left)
        if not left:
            return
        time.sleep(poll_s)


def wait_for_ids(job_ids: Sequence[str], poll_s: float = 5.0, on_poll: Callable[[int], Any] | None = None) -> None:
    """Block until none of the SLURM jobs `job_ids` is in squeue (jobs submitted by an earlier launch)."""
    while True:
        queued = slurm_queue.queued_job_ids() or set()
        left = sum(job in queued for job in job_ids)
        if on_poll:
            on_poll(left)
        if not left:
            return
        time.sleep(poll_s)
