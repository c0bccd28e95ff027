"""Launchers: where a sweep's runs execute. `launch` plans (bench.launch.plan), hands the runs
still to do to the chosen launcher (inline, local or slurm) and, once they are done, logs
what happened. Re-launching a sweep does only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from mmbalance.bench.claim import describe_holder
from mmbalance.bench.config import RunConfig
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import ENDED, PlannedRun, decide, format_plan, label, levels, plan, to_run
from mmbalance.bench.store import RunDir, Store

log = logging.getLogger(__name__)


def launch(configs: Sequence[RunConfig], store: Store, options: LauncherConfig, *, wait: bool = False,
           cluster: str | None = None, poll_s: float = 5.0,
           follow: Callable[[str], Sequence[RunConfig]] | None = None) -> int:
    """Run (or submit) every unfinished run of `configs`. Returns the exit code: 0 when every
    run is finished, or, for slurm without `wait`, when the submission went through.

    `follow(run_id)`, called each time a run of this launch ends, returns more configs to run in it
    (a tuning study's next trials); the inline and local launchers take them, slurm does not."""
    if follow is not None and options.name == "slurm":
        raise ValueError("follow: runs added while a launch runs need the inline or local launcher")
    planned = plan(configs, store)
    todo = to_run(planned)
    if todo and options.name != "inline":  # run_inline makes the same check, on the datasets it trains on
        from mmbalance.bench.sweep import check_runs

        # slurm's jobs may read disks this machine does not see: missing data is a note there
        for note in check_runs([p.cfg for p in todo], need_data=options.name == "local"):
            log.warning(note)
    log.info(format_plan(planned).splitlines()[0])
    if not todo:
        active = [p for p in planned if p.state in ("queued", "running")]
        if active and wait and options.name == "slurm":  # a launch that returned early: wait for its jobs
            from mmbalance.bench.launch.slurm import wait_for_ids

            wait_for_ids(active_job_ids(active), poll_s, Progress(len(active)))
        elif active:
            log.info(f"nothing to launch: {len(active)} run(s) still queued or running; "
                     f"see mmbalance status {active[0].run_dir.path.parent}")
            return 0
        return outcome(planned)
    more = following(follow, planned, store) if follow else None
    if options.name == "inline":
        from mmbalance.bench.sweep import run_inline
        from mmbalance.core.errors import RunFailed

        batch = todo
        while batch:
            try:
                run_inline([p.cfg for p in batch], store)
            except RunFailed:
                pass  # recorded in each run's status; summarised below
            batch = [q for p in batch for q in more(p)] if more else []
    elif options.name == "local":
        from mmbalance.bench.launch.local import launch_local

        launch_local(todo, options, more)
    else:
        return launch_slurm(todo, planned, store, options, wait, cluster, poll_s)
    return outcome(planned)


def launch_slurm(todo: list[PlannedRun], planned: list[PlannedRun], store: Store, options: LauncherConfig,
                 wait: bool, cluster: str | None, poll_s: float) -> int:
    """One job array per wave of `todo` (plan.levels): runs that require others go in a later array,
    submitted with a SLURM dependency (afterany) on the earlier arrays and on the jobs of required
    runs that earlier launches queued; a run whose requirement did not finish fails naming it."""
    from mmbalance.bench.launch import slurm

    group = todo[0].cfg.group
    folder = store.root / group / ".submitit"
    k = options.packing()
    jobs: list = []
    after = active_job_ids([p for p in planned if p.state in ("queued", "running")
                            and any(p.run_dir.run_id in q.needs.values() for q in todo)])
    for wave in levels(todo):
        executor = slurm.make_executor(folder, options, f"mmb-{group}", cluster, after=after)
        submitted = slurm.submit(wave, executor, k, options.cpus_per_task)
        if submitted:
            array = str(submitted[0].job_id).split("_")[0]
            packed = f", {k} per task at once ({len(submitted)} array task(s))" if k > 1 else ""
            waits = f", after job(s) {', '.join(after)}" if after else ""
            log.info(f"submitted {len(wave)} run(s){packed} as job array {array} ({submitted[0].job_id} .. "
                     f"{submitted[-1].job_id}){waits}; logs in {folder}")
            after = [*after, array]
        jobs.extend(submitted)
    if not jobs:  # every run was taken or finished by another launch since this one planned
        return outcome(planned)
    if not wait:
        log.info(f"follow with: mmbalance status {store.root / group}   (or: mmbalance sweep ... --wait)")
        return 0
    slurm.wait(jobs, poll_s, on_poll=Progress(len(jobs)))
    earlier = active_job_ids([p for p in planned if p.state in ("queued", "running")])
    if earlier:  # runs an earlier launch had queued: the summary waits for them too
        slurm.wait_for_ids(earlier, poll_s, Progress(len(earlier)))
    return outcome(planned)


def following(follow: Callable[[str], Sequence[RunConfig]], planned: list[PlannedRun],
              store: Store) -> Callable[[PlannedRun], list[PlannedRun]]:
    """The runs to add once a run has ended: `follow`'s configs planned, those left to run and not
    yet in this launch; they join `planned`, so that the launch's outcome covers them."""
    def more(ended: PlannedRun) -> list[PlannedRun]:
        known = {p.run_dir.run_id for p in planned}
        new = [p for p in to_run(plan(follow(ended.run_dir.run_id), store)) if p.run_dir.run_id not in known]
        planned.extend(new)
        return new

    return more


def active_job_ids(planned: Sequence[PlannedRun]) -> list[str]:
    """The job ids of `planned`, each once (packed runs share their array task's id)."""
    ids = (p.run_dir.status().get("job_id") for p in planned)
    return list(dict.fromkeys(str(job) for job in ids if job))


class Progress:
    """Logs how many jobs are left whenever that number changes (while --wait polls)."""

    def __init__(self, total: int) -> None:
        self.total, self.last = total, -1

    def __call__(self, left: int) -> None:
        if left != self.last:
            log.info(f"waiting: {left} of {self.total} job(s) queued or running")
            self.last = left


def outcome(planned: Sequence[PlannedRun]) -> int:
    """Log how the runs ended (failed ones with their error and log, those another process
    holds with their holder) and return 0 iff every run is finished, pruned or held by another process
    (being trained there is not this launch's failure). A run its job left as pending/running
    (cancelled, killed) is marked interrupted: launching again resumes it."""
    from mmbalance.bench.launch.jobs import have_slurm, queued_job_ids

    queued = queued_job_ids()
    silent = queued is None and have_slurm()  # squeue failed: a job's end cannot be told from its silence
    queued = queued or set()
    states: dict[str, int] = {}
    failed, elsewhere = [], []
    for p in planned:
        status = p.run_dir.status()
        state = status["state"]
        live = "finished" if state == "finished" else decide(p.run_dir, queued)  # this launch's jobs have ended
        if live in ("queued", "running"):  # by another launch
            state = ELSEWHERE
            where = f"running {describe_holder(p.run_dir)}" if live == "running" else "queued by another launch"
            elsewhere.append(f"  {label(p.cfg)} seed {p.cfg.train.seed} {p.run_dir.run_id}: {where}")
        elif not silent and state in ("pending", "running") and status.get("job_id") and status["job_id"] not in queued:
            p.run_dir.set_status("interrupted", error=f"job {status['job_id']} ended without recording an end "
                                 "(cancelled, killed or out of memory?)")
            state = "interrupted"
        states[state] = states.get(state, 0) + 1
        if state in ("failed", "interrupted"):
            status = p.run_dir.status()
            failed.append(f"  {label(p.cfg)} seed {p.cfg.train.seed} {p.run_dir.run_id}: "
                          f"{status.get('error', '?')}\n    log: {log_of(status, p.run_dir.path)}")
    log.info(f"{len(planned)} runs: " + ", ".join(f"{n} {s}" for s, n in states.items()))
    if elsewhere:
        log.warning(f"{ELSEWHERE}, left alone (see mmbalance status {planned[0].run_dir.path.parent}):\n"
                    + "\n".join(elsewhere))
    if failed:
        log.warning("not finished:\n" + "\n".join(failed)
                    + "\nlaunch the sweep again to retry them (finished runs are skipped, started ones resume)")
    return 0 if sum(states.get(s, 0) for s in (*ENDED, ELSEWHERE)) == len(planned) else 1


ELSEWHERE = "being trained elsewhere"


def log_of(status: dict, run_path: Path) -> str:
    rd = RunDir(run_path)
    return str(rd.resolve(status["log"]) if status.get("log") else rd.status_file)
