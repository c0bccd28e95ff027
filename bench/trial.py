"""A run that is a tuning trial: the run side of `mmbalance tune` (bench.tune drives the study).

`mmbalance tune` asks its Optuna study for trials and hands each to the sweep's launcher as an
ordinary run whose config carries a `trial:` link (`TrialLink`: the study's journal file, its
name, the trial's id and number, the pruner's settings; not part of the run id). Wherever the run
executes (this process, a local worker, a SLURM array task), `bench.train.run` sees the link and
reports the validation metric after every epoch to the trial (`epoch_reporter`); when the study's
median pruner says so, the run tells the study the trial is pruned and ends as `pruned`. A finished
run's value is told by the tuning driver, from the run's summary: the store stays the one record.

The study lives in a journal file (Optuna's JournalFileBackend) rather than SQLite: many processes,
on several nodes of a shared filesystem, write to it at once, which is what that backend is for.
Optuna is imported only here and in bench.tune, and only once a trial runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from mmbalance.core.params import Strict


class TrialLink(Strict):
    """Which trial of which study a run is, and how the study prunes."""

    storage: str  # the study's journal file (absolute)
    study: str
    trial_id: int = Field(ge=0)  # the storage's id (what optuna.trial.Trial is opened with)
    number: int = Field(ge=0)  # the trial's number in its study (what the report shows)
    startup_trials: int = Field(ge=0)  # MedianPruner: finished trials before any pruning
    warmup_epochs: int = Field(ge=0)  # MedianPruner: epochs of a trial before it may be pruned


def journal(path: str | Path) -> Any:
    """The Optuna storage of the study file at `path` (created on first write)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def median_pruner(startup_trials: int, warmup_epochs: int) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)


def open_trial(link: TrialLink) -> tuple[Any, Any]:
    """(study, trial) of a link, the study with the link's pruner."""
    import optuna

    study = optuna.load_study(study_name=link.study, storage=journal(link.storage),
                              pruner=median_pruner(link.startup_trials, link.warmup_epochs))
    return study, optuna.trial.Trial(study, link.trial_id)


def epoch_reporter(link: TrialLink, metric: str) -> Any:
    """The epoch callback of a trial run: report `record['val'][metric]` (validation only: the
    pruner never sees test) and, when pruned, tell the study and raise bench.train.RunPruned."""
    from mmbalance.bench.train import RunPruned

    study, trial = open_trial(link)

    def report(epoch: int, record: dict[str, Any]) -> None:
        trial.report(float(record["val"][metric]), epoch)
        if trial.should_prune():
            from optuna.trial import TrialState

            study.tell(link.number, state=TrialState.PRUNED, skip_if_finished=True)
            raise RunPruned(f"tuning trial {link.number} of {link.study!r} pruned after epoch {epoch} "
                            f"(val {metric} {record['val'][metric]:.4f}, below the median of earlier trials)")

    return report
