"""The SLURM launcher: one submitit job array per launch, one array task per run.

Each task runs `SweepJob`, a submitit Checkpointable: on a time-out or pre-emption submitit calls
its `checkpoint()`, which marks the run pending and requeues the same call; the requeued task
resumes from the run's checkpoint.pt (bench.train.run resumes unfinished runs). Runs that are
finished or still queued are never submitted (bench.launch.plan decides).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from bench.launch import jobs as slurm_queue
from bench.launch.options import LauncherConfig
from bench.launch.plan import PlannedRun
from bench.launch.worker import run_one
from bench.store import RunDir


class SweepJob(submitit.helpers.Checkpointable):
    """What an array task runs: one run directory, trained (or resumed) to the end."""

    def __call__(self, run_dir: str) -> str:
        return run_one(run_dir, **placement())

    def checkpoint(self, run_dir: str) -> submitit.helpers.DelayedSubmission:
        rd = RunDir(Path(run_dir))
        status = rd.status()
        if status["state"] != "finished":
            rd.set_status("pending", note="requeued after a time-out or pre-emption; resumes from its checkpoint",
                          restarts=int(status.get("restarts", 0)) + 1)
        return super().checkpoint(run_dir)


def placement() -> dict[str, str]:
    """This task's job id and log files, as submitit's job environment knows them."""
    env = submitit.JobEnvironment()
    try:
        return {"job_id": str(env.job_id), "log": str(env.paths.stderr), "stdout": str(env.paths.stdout)}
    except KeyError:  # submitit's in-process debug executor has no job folder
        return {"job_id": str(env.job_id)}


def make_executor(folder: Path, options: LauncherConfig, name: str, cluster: str | None = None) -> submitit.Executor:
    """An AutoExecutor (SLURM where sbatch exists; `cluster` picks another, e.g. 'local' in
    tests) with the sweep's sbatch options. OMP_NUM_THREADS follows the CPUs given: SLURM
    without CPU binding would otherwise let torch use every core of the node."""
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
        slurm_additional_parameters=dict(options.sbatch_extra),
        **{k: v for k, v in optional.items() if v is not None},
    )
    return executor


def submit(todo: Sequence[PlannedRun], executor: submitit.Executor) -> list[submitit.Job]:
    """Submit one array task per run; each run's status becomes pending with its job id and log.
    If the submission fails, the runs' previous status files are put back."""
    if not todo:
        return []
    previous = {p.run_dir.path: p.run_dir.status_file.read_text() if p.run_dir.status_file.exists() else None
                for p in todo}
    for p in todo:
        p.run_dir.write_config(p.cfg.to_dict())
        p.run_dir.set_status("pending", job_id=None, log=None, stdout=None)
    try:
        jobs = executor.map_array(SweepJob(), [str(p.run_dir.path.resolve()) for p in todo])
    except BaseException:
        for p in todo:
            restore_status(p.run_dir, previous[p.run_dir.path])
        raise
    for p, job in zip(todo, jobs):
        if p.run_dir.status()["state"] == "pending":  # the task may already have started
            p.run_dir.set_status("pending", job_id=str(job.job_id), log=str(job.paths.stderr),
                                 stdout=str(job.paths.stdout))
    return jobs


def restore_status(rd: RunDir, text: str | None) -> None:
    if text is None:
        rd.status_file.unlink(missing_ok=True)
    else:
        from bench.store import atomic_write_json

        atomic_write_json(rd.status_file, json.loads(text))


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
