"""One run in a process of its own: what a local worker (`python -m mmbalance run-one RUN_DIR`) and a
SLURM job execute. The launcher has written the run's config.yaml; this trains it into the store
(bench.train.run skips it if finished, resumes it from checkpoint.pt if started) and records any
failure, with its traceback, in the run's status.json. Its threads follow the one thread policy
(bench.threads, applied by the trainer), with the launcher's OMP_NUM_THREADS as its share of the cores.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.logs import child_flags
from mmbalance.bench.store import RunDir, Store, atomic_write_text
from mmbalance.core.errors import EXIT_ELSEWHERE, EXIT_INTERRUPTED, ConfigError, RunFailed
from mmbalance.core.overrides import Sources

log = logging.getLogger(__name__)


def run_one_command(run_dir: str | Path) -> list[str]:
    """The command line of a run-one process (local workers, packed SLURM tasks): with -v when
    this process logs DEBUG, so that the run's log has the details this process shows."""
    return [sys.executable, "-m", "mmbalance", *child_flags(), "run-one", str(run_dir)]


def load_run(run_dir: str | Path) -> tuple[RunConfig, Store]:
    """The config of a prepared run directory (results/<group>/<id>) and its store."""
    rd = RunDir(Path(run_dir))
    if not rd.config.exists():
        raise ConfigError(f"{rd.path} has no config.yaml; a launcher writes it before it starts a run")
    data = rd.read_config()  # a damaged one: one line naming it (the launchers rewrite it before a run)
    sources = Sources()
    sources.record(data, str(rd.config))
    cfg = validate(data, sources)
    if cfg.run_id() != rd.run_id:
        raise ConfigError(f"{rd.config} resolves to run id {cfg.run_id()}, not its directory's {rd.run_id}")
    return cfg, Store(rd.path.parent.parent)


def run_one(run_dir: str | Path, **placement: str) -> str:
    """Train the run; returns its final state. Raises RunFailed (after recording it) on failure.
    `placement` (job_id, log) is written into its status first."""
    from mmbalance.bench.train import record_failure, run

    cfg, store = load_run(run_dir)
    rd = store.run_dir(cfg.group, cfg.run_id())
    try:
        result = run(cfg, store, on_claim=lambda claimed: record_placement(claimed, **placement))
        if result.note:
            log.info(f"{rd.path}: {result.note}")
        return result.state
    except RunFailed:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a ConfigError while building the model, say: still the run's failure
        raise record_failure(rd, e) from e


def record_placement(rd: RunDir, **placement: str) -> None:
    """Write where the run executes (job_id, log, stdout) into its status, unless it is finished."""
    status = rd.recorded_status()
    state = status["state"]
    if placement and state != "finished":
        rd.set_status("pending" if state in ("new", "damaged") else state, **placement, **slurm_restarts(status))


def slurm_restarts(status: dict) -> dict[str, int]:
    """{'restarts': n} where this SLURM job has been requeued n times (SLURM_RESTART_COUNT: every
    requeue, `scontrol requeue` included, not only the time-outs submitit's checkpoint sees) and
    the run records fewer; else nothing."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    if count.isdigit() and int(count) > int(status.get("restarts", 0)):
        return {"restarts": int(count)}
    return {}


def mark_pending(rd: RunDir, config: dict, **placement: str | None) -> str:
    """Write the run's config and mark it pending for this launcher (host, pid and start time
    recorded, so that `status` can tell when the launcher is gone), under the run's claim.
    Returns "pending", or why the run was left as it is: "elsewhere" (another process holds
    it) or "finished"."""
    from mmbalance.bench.claim import this_process, try_claim

    claim = try_claim(rd)
    if claim is None:
        return "elsewhere"
    with claim:
        if rd.summary.exists():
            return "finished"
        rd.write_config(config)
        rd.set_status("pending", launcher=this_process(), **placement)
        return "pending"


def place_claimed(rd: RunDir, **placement: str) -> bool:
    """record_placement under the run's claim, for a process that hands the run to a run-one
    process of its own; False (nothing written) when another process holds the run."""
    from mmbalance.bench.claim import try_claim

    claim = try_claim(rd)
    if claim is None:
        return False
    with claim:
        record_placement(rd, **placement)
    return True


def record_exit(rd: RunDir, code: int, killed: str = "failed") -> str:
    """The run's state once its `run-one` process has exited with `code`. A process that died
    before it could record anything (out of memory, a signal) leaves its run as it was: it is
    marked failed (or `killed`, for one a signal ended) with the exit code; one a Ctrl-C
    stopped before its training started (exit EXIT_INTERRUPTED) is interrupted. One that left
    the run to the process holding its claim (exit EXIT_ELSEWHERE) is `elsewhere`, untouched."""
    from mmbalance.bench.claim import is_held

    if code == EXIT_ELSEWHERE:
        return "elsewhere"
    state = rd.recorded_status()["state"]
    if code != 0 and is_held(rd):  # taken by another process since this one ended: theirs to record
        return "elsewhere"
    if code != 0 and state not in ("failed", "interrupted"):
        if code == EXIT_INTERRUPTED:
            rd.set_status("interrupted", error="run-one process interrupted (SIGINT) before it recorded its state; "
                          "launch again to resume")
        elif code < 0 and killed != "failed":
            rd.set_status(killed, error=f"run-one process killed by signal {-code}; launch again to resume")
        else:
            rd.set_status("failed", error=f"worker process exited with code {code}",
                          traceback=f"see {rd.path / 'run.log'}")
        state = rd.status()["state"]
    return state


def saved_status(rd: RunDir) -> str | None:
    """The run's status file as it is (None: it has none), for restore_status to put back."""
    return rd.status_file.read_text() if rd.status_file.exists() else None


def restore_status(rd: RunDir, text: str | None) -> None:
    """Put back what saved_status returned: a launch that did not start the run leaves it as it
    was. Under the run's claim: a run another process has taken since, or finished, is theirs."""
    from mmbalance.bench.claim import try_claim

    claim = try_claim(rd)
    if claim is None:
        return
    with claim:
        if not rd.summary.exists():
            put_back_status(rd, text)


def put_back_status(rd: RunDir, text: str | None) -> None:
    if text is None:
        rd.status_file.unlink(missing_ok=True)
    else:
        atomic_write_text(rd.status_file, text)  # as it was, even damaged
