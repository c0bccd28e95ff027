"""`mmbalance status DIR` and `mmbalance cancel DIR`: the runs under DIR, read from the store's
status files (and, for SLURM jobs, from squeue)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from mmbalance.bench.cancel import CANCELLED_JOB
from mmbalance.bench.claim import is_held, process_gone
from mmbalance.bench.selection import best_epoch, select_metric
from mmbalance.bench.store import RunDir
from mmbalance.core.errors import DamagedFile, MMBalanceError, StoreError


def find_runs(path: Path) -> list[RunDir]:
    """Run directories at `path` itself, one level down (a group) or two (the store root)."""
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise StoreError(f"{path}: {what}; give a run directory, a group directory (results/<group>) "
                         "or the store root (results)")
    for depth in ("", "*/", "*/*/"):
        found = sorted(path.glob(f"{depth}config.yaml"))
        if found:
            return [RunDir(p.parent) for p in found]
    return []


class Snapshot(RunDir):
    """A run directory whose records are read once each: `status` looks at a run's files three
    times (its damage check, `done`, its row), and a store of 1,000 runs is read within a second
    or two only when each file is parsed once. A damaged record is remembered and raised again.
    For reading only: a write through it would not be seen by its later reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._read: dict[str, Any] = {}

    def _once(self, name: str, read: Callable[[], Any]) -> Any:
        if name not in self._read:
            try:
                self._read[name] = read()
            except DamagedFile as e:
                self._read[name] = e
        found = self._read[name]
        if isinstance(found, DamagedFile):
            raise found.with_traceback(None)
        return found

    def read_config(self) -> dict[str, Any]:
        return self._once("config", super().read_config)

    def status(self) -> dict[str, Any]:
        return self._once("status", super().status)

    def read_metrics(self) -> list[dict[str, Any]]:
        return self._once("metrics", super().read_metrics)

    def read_summary(self) -> dict[str, Any] | None:
        return self._once("summary", super().read_summary)


def shown_state(status: dict[str, Any], queued: set[str] | None = None, held: bool = False) -> str:
    """The recorded state, with 'running'/'pending' marked stale when nothing carries it on: its
    SLURM job has left the queue (`queued`: squeue's job ids, None when unknown: then marked
    unchecked) or, for a run without a job, no process holds its claim (`held`:
    bench.claim.is_held; a killed process cannot record its own end; launching again resumes it)
    and, for a pending one, the local launcher that marked it is gone. A recorded pid alone
    decides nothing: it may be reused."""
    state = status["state"]
    if state not in ("running", "pending") or held:
        return state
    job = status.get("job_id")
    if job:
        if queued is None:
            return f"{state} (unchecked: no word from SLURM)"
        if str(job) not in queued:
            return f"{state} (stale: job gone)"
        return state
    if state == "running":
        return "running (stale: process gone)"
    if status.get("launcher") and process_gone(status["launcher"]):
        return "pending (stale: launcher gone)"
    return state


def claim_held(rd: RunDir) -> bool:
    """is_held, or True where the filesystem has no locks (nothing can be said: the recorded
    state is shown as it is; launching there refuses with the reason)."""
    try:
        return is_held(rd)
    except StoreError:
        return True


COUNTED = ("finished", "running", "pending", "failed", "interrupted")


def status_table(path: Path) -> str:
    """One line per run, then the counts, then every failed, interrupted or damaged run with the first
    line of its error, its log and its job id."""
    runs = [Snapshot(rd.path) for rd in find_runs(path)]
    if not runs:
        return f"{path}: no runs (no */config.yaml below it)"
    from mmbalance.bench.launch.jobs import queued_job_ids

    queued = queued_job_ids()
    rows, problems = [], []
    for rd in runs:
        # a finished run needs its checkpoints no more
        damage = rd.damage() or (None if rd.done() else rd.checkpoint_damage())
        if damage:  # shown, and the other runs go on
            rows.append(damaged_row(rd, damage))
            problems.append(problem_line(rd, rows[-1], {"error": str(damage)}))
            continue
        st, cfg = rd.status(), rd.read_config()
        history = rd.read_metrics()
        metric = select_metric(cfg)
        best = best_epoch(history, metric)
        rows.append({
            "run": f"{rd.path.parent.name}/{rd.run_id}",
            "label": cfg.get("label") or cfg["method"]["name"],
            "seed": cfg["train"]["seed"],
            "state": shown_state(st, queued, claim_held(rd)),
            "epochs done": f"{len(history)}/{cfg['train']['epochs']}",
            "best-val epoch": best["epoch"] if best else "–",
            "best val": f"{metric} {best['val'][metric]:.3f}" if best else "–",
            "test acc @ best val": f"{best['test']['acc']:.3f}" if best else "–",
            "updated": st.get("updated", "–"),
            "job": st.get("job_id", ""),
        })
        if st["state"] in ("failed", "interrupted") or "stale" in rows[-1]["state"]:
            problems.append(problem_line(rd, rows[-1], st))
    if not any(row["job"] for row in rows):
        rows = [{k: v for k, v in row.items() if k != "job"} for row in rows]
    # pandas' to_markdown without pandas; floatfmt: tabulate reads '0.810' as a number and would
    # print it as 0.81
    table = tabulate(rows, headers="keys", tablefmt="pipe", floatfmt=".3f")
    return "\n\n".join([table, count_line([row["state"] for row in rows])] + (
        ["failed, interrupted or damaged:\n" + "\n".join(problems)] if problems else []) + unchecked_note(rows))


def unchecked_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where squeue gave no answer, why, and what that leaves unknown: runs under SLURM jobs show
    their recorded state, which a job that died without a word leaves as it was."""
    unchecked = sum("unchecked" in row["state"] for row in rows)
    if not unchecked:
        return []
    from mmbalance.bench.launch.jobs import squeue_failure

    return [f"note: {squeue_failure()}; {unchecked} run(s) under SLURM jobs show their recorded state, "
            "not checked against the queue (run status again once SLURM answers)"]


def count_line(states: Sequence[str]) -> str:
    """'N runs: a finished, b running, c pending, d failed, e interrupted' (stale ones named), then
    any other state ('damaged', 'new'), most frequent first."""
    base = Counter(state.split(" ")[0] for state in states)
    stale = sum("stale" in state for state in states)
    unchecked = sum("unchecked" in state for state in states)
    other = Counter({s: n for s, n in base.items() if s not in COUNTED}).most_common()
    parts = [f"{base[s]} {s}" for s in COUNTED] + [f"{n} {s}" for s, n in other]
    return (f"{len(states)} runs: " + ", ".join(parts) + (f" ({stale} stale: launch again to resume)" if stale else "")
            + (f" ({unchecked} unchecked: no word from SLURM)" if unchecked else ""))


def damaged_row(rd: RunDir, damage: DamagedFile) -> dict[str, Any]:
    """The status row of a run with a damaged file: 'damaged (<file>: <why>)', with what of its
    config can still be read."""
    try:
        cfg = rd.read_config()
    except MMBalanceError:
        cfg = {}
    return {"run": f"{rd.path.parent.name}/{rd.run_id}",
            "label": cfg.get("label") or (cfg.get("method") or {}).get("name", "?"),
            "seed": (cfg.get("train") or {}).get("seed", "?"),
            "state": f"damaged ({damage.path.name}: {damage.why})",
            "epochs done": "–", "best-val epoch": "–", "best val": "–", "test acc @ best val": "–",
            "updated": "–", "job": ""}


def problem_line(rd: RunDir, row: dict[str, Any], status: dict[str, Any]) -> str:
    job = f" job {status['job_id']}" if status.get("job_id") else ""
    log = rd.resolve(status["log"]) if status.get("log") else rd.status_file
    error = (status.get("error") or row["state"]).splitlines()[0]
    return f"  {row['run']} ({row['label']}, seed {row['seed']}{job}): {error}\n    log: {log}"


def cancel(path: Path) -> str:
    """scancel every SLURM job of a run under `path` that is still pending or running, and mark
    those runs interrupted (launching again resumes them)."""
    from mmbalance.bench.launch.jobs import cancel_jobs, queued_job_ids

    queued = queued_job_ids()
    targets = []
    for rd in find_runs(path):
        st = rd.recorded_status()
        job = st.get("job_id")
        if st["state"] in ("pending", "running") and job and (queued is None or str(job) in queued):
            targets.append((rd, str(job)))
    if not targets:
        return f"{path}: no pending or running SLURM jobs to cancel"
    said = cancel_jobs(job for _, job in targets)
    for rd, job in targets:
        rd.set_status("interrupted", error=f"job {job} cancelled (mmbalance cancel)", **{CANCELLED_JOB: job})
    lines = [f"cancelled {len(targets)} job(s): " + " ".join(job for _, job in targets)]
    lines += [f"  {rd.path.parent.name}/{rd.run_id}: job {job}" for rd, job in targets]
    return "\n".join(lines + ([f"scancel: {said}"] if said else []))
