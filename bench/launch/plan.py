"""Which runs of a sweep to do: the one decision every launcher and `--dry-run` share.

The runs that the runs given require (Method.requires: UMT's teachers) are added, each before
the first run that needs it (bench.requirements); each planned run lists the ids it needs.

finished: skipped. pruned: a tuning trial its study stopped (bench.trial), skipped too.
queued/running: held by a live SLURM job, by a process holding the run's claim (bench.claim) or
by a live local launcher that marked it pending, left alone. resume: started before (a
checkpoint exists), continues from it. new: starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mmbalance.bench.claim import is_held, is_this, process_gone
from mmbalance.bench.config import RunConfig
from mmbalance.bench.launch import jobs
from mmbalance.bench.requirements import needs, with_requirements
from mmbalance.bench.store import RunDir, Store

TO_RUN = ("resume", "new")
ENDED = ("finished", "pruned")  # states a run stays in: nothing left to do (pruned: a tuning trial)
ORDER = ("finished", "pruned", "queued", "running", "unknown", "resume", "new")
# how format_plan names a state where its name alone would not say it
SHOWN = {"resume": "will resume", "pruned": "pruned (a tuning trial its study stopped: final)",
         "unknown": "unknown (SLURM not answering: squeue failed; left alone until it answers)"}


@dataclass
class PlannedRun:
    cfg: RunConfig
    run_dir: RunDir
    state: str  # one of ORDER
    was: str  # the recorded state ("new" when nothing is recorded)
    damage: str = ""  # what is damaged and what the launch does about it (damage_note)
    needs: dict[str, str] = field(default_factory=dict)  # requirement name -> the required run's id


def decide(run_dir: RunDir, queued: set[str] | None) -> str:
    """Whether a run is live is decided by its claim (a process trains it) and, for a SLURM job,
    by squeue; a pending run whose local launcher is still alive is queued with that launcher.
    A recorded pid alone decides nothing: it may name another process by now."""
    status = run_dir.recorded_status()
    state = status["state"]
    if run_dir.done():
        return "finished"
    if state == "pruned":  # ended for good: its study stopped it (bench.trial)
        return "pruned"
    if is_held(run_dir):
        return "running"
    if state in ("pending", "running"):
        job = status.get("job_id")
        if job and queued is not None and str(job) in queued:
            return "queued" if state == "pending" else "running"
        launcher = status.get("launcher")
        if state == "pending" and not job and launcher and not process_gone(launcher) and not is_this(launcher):
            return "queued"
    return "resume" if run_dir.checkpoint.exists() and not run_dir.checkpoint_damage() else "new"


def damage_note(run_dir: RunDir, state: str) -> str:
    """'damaged <file>: <why>; <what the launch does>' for a run with a damaged file, else ''."""
    damage = run_dir.damage() or run_dir.checkpoint_damage()
    if damage is None or state not in TO_RUN:
        return ""
    if damage.path in (run_dir.checkpoint, run_dir.best):
        does = "restarts from scratch, keeping it aside"
    elif state == "resume":
        does = "resumes from checkpoint.pt, rewriting it"
    else:
        does = "starts again, keeping it aside"
    return f"damaged {damage.path.name}: {damage.why}; {does}"


def plan(configs: Sequence[RunConfig], store: Store) -> list[PlannedRun]:
    """Every run of `configs` and the runs they require (requirements first), each with its state."""
    queued = jobs.queued_job_ids()
    silent = queued is None and jobs.have_slurm()
    planned = []
    for cfg in with_requirements(configs):
        rd = store.run_dir(cfg.group, cfg.run_id())
        state = "unknown" if silent and held_by_a_job(rd) else decide(rd, queued)
        planned.append(PlannedRun(cfg, rd, state, rd.recorded_status()["state"], damage_note(rd, state), needs(cfg)))
    return planned


def held_by_a_job(run_dir: RunDir) -> bool:
    """The run is pending or running under a SLURM job: whether that job still lives, only squeue can say."""
    status = run_dir.recorded_status()
    return status["state"] in ("pending", "running") and bool(status.get("job_id"))


def to_run(planned: Sequence[PlannedRun]) -> list[PlannedRun]:
    return [p for p in planned if p.state in TO_RUN]


def waiting_on(todo: Sequence[PlannedRun]) -> dict[str, set[str]]:
    """Run id -> the ids of the runs of `todo` it requires: what must end before it starts (a
    requirement not in `todo` has finished, or another launch holds it)."""
    ids = {p.run_dir.run_id for p in todo}
    return {p.run_dir.run_id: {rid for rid in p.needs.values() if rid in ids} for p in todo}


def levels(todo: Sequence[PlannedRun]) -> list[list[PlannedRun]]:
    """`todo` in waves, in order: the runs that require none of `todo`, then those that require
    only runs of the first wave, and so on (plan puts requirements first, so one pass does it)."""
    waits, level = waiting_on(todo), {}
    for p in todo:
        level[p.run_dir.run_id] = 1 + max((level[r] for r in waits[p.run_dir.run_id]), default=-1)
    waves: list[list[PlannedRun]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for p in todo:
        waves[level[p.run_dir.run_id]].append(p)
    return waves


def counts(planned: Sequence[PlannedRun]) -> dict[str, int]:
    return {s: n for s in ORDER if (n := sum(p.state == s for p in planned))}


def format_plan(planned: Sequence[PlannedRun]) -> str:
    """A count line, then one line per run: label, seed, run id, state (and the recorded state
    where it differs), and under it a `needs:` line per run it requires (label, run id)."""
    summary = ", ".join(f"{n} {SHOWN.get(s, s)}" for s, n in counts(planned).items())
    width = max((len(label(p.cfg)) for p in planned), default=5)
    labels = {p.cfg.run_id(): label(p.cfg) for p in planned}
    lines = [f"{len(planned)} runs: {summary or 'none'}"]
    for p in planned:
        note = f" (was {p.was})" if p.was not in (p.state, "new") and p.state != "finished" else ""
        note = f" ({p.damage})" if p.damage else note
        lines.append(f"  {label(p.cfg):<{width}}  seed {p.cfg.train.seed:<3} {p.cfg.run_id()}  {p.state}{note}")
        lines.extend(f"      needs: {labels.get(rid, name)} {rid}" for name, rid in p.needs.items())
    return "\n".join(lines)


def label(cfg: RunConfig) -> str:
    return cfg.label or cfg.method["name"]
