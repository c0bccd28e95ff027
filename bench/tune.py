"""`mmbalance tune SWEEP.yaml --trials N`: the same tuning budget for every cell of a sweep.

For each cell (a row label of the sweep), an Optuna study searches the method's declared space
(the Params fields made with `core.params.tunable`) and the optimiser's lr (`TuneOptions.lr_low`
to `lr_high`, log scale; a method with nothing tunable tunes lr only) with N trials: a seeded TPE
sampler and a median pruner fed with the validation metric (`eval.select_metric`) after every
epoch, through `train.run`'s epoch callback (the training loop knows nothing of Optuna). A trial
is one normal run on the sweep's first seed, stored at `results/<group>/tuning/<cell>/<run id>`,
and scored by its best-validation value; the test split is never read. The chosen configuration
(the best completed trial) is then run over every seed of the sweep as `<cell>-tuned`, beside the
sweep's default runs, which `tune` runs too.

Each study lives in `results/<group>/tuning/<cell>.db` (SQLite through Optuna's RDB storage), so a
killed `tune` resumes: finished trials stay, a trial the kill cut short is asked again with the
same parameters (its run resumes from its checkpoint), and only the trials still missing run.
`<cell>.json` beside it is what the report reads (bench.report.tuning: the report imports no
Optuna). One `tune` process per study at a time: a trial left `RUNNING` is taken for a dead one.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.store import Store, atomic_write_json
from mmbalance.bench.sweep import DatasetCache, labels_in_order, load_sweep, run_inline
from mmbalance.bench.train import DatasetSource, RunStopped, run
from mmbalance.core.errors import ConfigError, RunFailed
from mmbalance.core.params import Range, Strict, search_space
from mmbalance.core.registry import METHODS

log = logging.getLogger(__name__)

LR = "optim.lr"  # the trial parameter that is the optimiser's lr (method parameters: their field names)
TUNED = "-tuned"  # suffix of the tuned cell's label
FAILED_RUN = "run_failed"  # user attr of a trial whose run failed (it counts: the budget was spent)


class TuneOptions(Strict):
    trials: int = Field(ge=1)
    lr_low: float = Field(1e-4, gt=0)
    lr_high: float = Field(1e-1, gt=0)
    sampler_seed: int = 0
    startup_trials: int = Field(3, ge=0)  # MedianPruner: trials before any pruning
    warmup_epochs: int = Field(1, ge=0)  # MedianPruner: epochs of a trial before it may be pruned
    workers: int = Field(1, ge=1)  # studies (cells) at once, each in a worker process

    @model_validator(mode="after")
    def _lr_range(self) -> TuneOptions:
        Range(low=self.lr_low, high=self.lr_high, log=True)  # raises naming the bad bounds
        return self


def tune_options(**values: Any) -> TuneOptions:
    """TuneOptions from the command line's values, a bad one named in one line."""
    try:
        return TuneOptions(**values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "--lr-range"
        raise ConfigError(f"tune option {where}: {first['msg']} (got {values.get(where, values)})") from None


@dataclass
class Cell:
    """One cell of the sweep: its row label, a file-safe name and its run config per seed."""

    label: str
    name: str
    seeds: list[RunConfig]

    def space(self, options: TuneOptions) -> dict[str, Range]:
        return {**search_space(METHODS.get(self.seeds[0].method["name"]).Params),
                LR: Range(low=options.lr_low, high=options.lr_high, log=True)}


def cells_of(configs: Sequence[RunConfig]) -> list[Cell]:
    cells = []
    for label in labels_in_order(configs):
        seeds = [c for c in configs if (c.label or c.method["name"]) == label]
        cells.append(Cell(label, re.sub(r"[^A-Za-z0-9_.-]+", "_", label), seeds))
    return cells


def with_params(cfg: RunConfig, params: dict[str, Any], group: str, label: str) -> RunConfig:
    """`cfg` with a trial's parameters (method fields, and LR), in `group` under `label`."""
    data = cfg.to_dict()
    data["method"].update({k: v for k, v in params.items() if k != LR})
    data["optim"]["lr"] = params[LR]
    data.update(group=group, label=label)
    return validate(data)


def suggest(trial: Any, space: dict[str, Range]) -> dict[str, Any]:
    return {name: (trial.suggest_int(name, int(r.low), int(r.high), log=r.log) if r.integer
                   else trial.suggest_float(name, r.low, r.high, log=r.log)) for name, r in space.items()}


def tuning_dir(store: Store, group: str) -> Path:
    return store.root / group / "tuning"


def open_study(path: Path, options: TuneOptions) -> Any:
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=path.stem, storage=f"sqlite:///{path.resolve()}", load_if_exists=True, direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials,
                                           n_warmup_steps=options.warmup_epochs))
    # seeded by the trials already there: a resumed study would otherwise ask its first points again
    study.sampler = optuna.samplers.TPESampler(seed=options.sampler_seed + len(study.trials))
    return study


def counted(trial: Any) -> bool:
    """A trial that spent its share of the budget: completed, pruned, or its run failed."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and FAILED_RUN in trial.user_attrs)


def requeue_cut_short(study: Any) -> None:
    """Trials a kill cut short (still RUNNING, or FAIL by an interrupt) are marked failed and their
    parameters asked again, once: the same config is the same run id, whose run resumes."""
    from optuna.trial import TrialState

    for t in study.trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.trials
    for i, t in enumerate(trials):
        if t.state == TrialState.FAIL and not counted(t) and not any(u.params == t.params for u in trials[i + 1:]):
            study.enqueue_trial(t.params)


def objective(cell: Cell, store: Store, datasets: DatasetSource, options: TuneOptions) -> Callable[[Any], float]:
    import optuna

    base, metric = cell.seeds[0], cell.seeds[0].eval.select_metric
    trials = Store(tuning_dir(store, base.group))

    def trial_run(trial: optuna.Trial) -> float:
        cfg = with_params(base, suggest(trial, cell.space(options)), cell.name, f"{cell.label}/trial")
        trial.set_user_attr("run_id", cfg.run_id())

        def report(epoch: int, record: dict[str, Any]) -> None:
            trial.report(record["val"][metric], epoch)  # validation only: the pruner never sees test
            if trial.should_prune():
                raise RunStopped(f"tuning trial {trial.number} pruned at epoch {epoch} (median rule)")

        try:
            result = run(cfg, trials, datasets, on_epoch=report)
        except RunStopped as e:
            raise optuna.TrialPruned(str(e)) from None
        except RunFailed as e:
            trial.set_user_attr(FAILED_RUN, str(e))
            raise
        if result.state == "elsewhere":
            raise ConfigError(f"trial run {result.run_id} is held by another process ({result.note}); "
                              "run one `mmbalance tune` per sweep at a time")
        return float(result.summary["best_val"]["val"][metric])

    return trial_run


def tune_cell(cell: Cell, store: Store, options: TuneOptions, datasets: DatasetSource | None = None,
              callbacks: Sequence[Callable] = ()) -> dict[str, Any]:
    """Run (or resume) the cell's study to `options.trials` counted trials; write and return its record."""
    path = tuning_dir(store, cell.seeds[0].group) / f"{cell.name}.db"
    study = open_study(path, options)
    requeue_cut_short(study)
    missing = options.trials - sum(counted(t) for t in study.trials)
    if missing > 0:
        log.info(f"tuning {cell.label!r}: {missing} of {options.trials} trials to run ({path})")
        study.optimize(objective(cell, store, datasets or DatasetCache(), options), n_trials=missing,
                       catch=(RunFailed,), callbacks=list(callbacks))
    record = study_record(cell, study, options)
    atomic_write_json(path.with_suffix(".json"), record)
    return record


def study_record(cell: Cell, study: Any, options: TuneOptions) -> dict[str, Any]:
    """What the report reads: every trial in order, the chosen parameters and both labels."""
    done = [t for t in study.trials if counted(t)]
    complete = [t for t in done if t.value is not None and t.state.name == "COMPLETE"]
    if not complete:
        raise RunFailed(f"tuning {cell.label!r}: none of its {len(done)} trials completed; nothing to choose")
    best = max(complete, key=lambda t: (t.value, -t.number))  # the earliest of equal values
    return {
        "label": cell.label, "tuned_label": cell.label + TUNED, "method": cell.seeds[0].method["name"],
        "metric": f"best val {cell.seeds[0].eval.select_metric}", "trials_budget": options.trials,
        "space": {k: r.model_dump() for k, r in cell.space(options).items()},
        "chosen": best.params, "chosen_trial": best.number, "chosen_value": best.value,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "run_id": t.user_attrs.get("run_id")} for t in done],
    }


def tuned_configs(cell: Cell, chosen: dict[str, Any]) -> list[RunConfig]:
    return [with_params(cfg, chosen, cfg.group, cell.label + TUNED) for cfg in cell.seeds]


def tune_in_worker(cell: Cell, root: str, options: TuneOptions) -> dict[str, Any]:
    return tune_cell(cell, Store(Path(root)), options)


def tune(path: str | Path, overrides: Sequence[str], store: Store, options: TuneOptions,
         callbacks: Sequence[Callable] = ()) -> tuple[list[RunConfig], dict[str, dict[str, Any]]]:
    """Tune every cell of the sweep at `path`, then run its default and tuned runs; returns (every
    run config of the sweep and its tuned cells, each cell's study record by label)."""
    sweep, configs = load_sweep(path, overrides)
    cells = cells_of(configs)
    datasets = DatasetCache()
    if options.workers > 1 and len(cells) > 1:
        context = multiprocessing.get_context("spawn")  # as bench.parallel: no forked torch state
        with ProcessPoolExecutor(min(options.workers, len(cells)), mp_context=context) as pool:
            records = list(pool.map(tune_in_worker, cells, [str(store.root)] * len(cells), [options] * len(cells)))
    else:
        records = [tune_cell(cell, store, options, datasets, callbacks) for cell in cells]
    tuned = [cfg for cell, rec in zip(cells, records) for cfg in tuned_configs(cell, rec["chosen"])]
    run_inline([*configs, *tuned], store, workers=options.workers)
    return [*configs, *tuned], {rec["label"]: rec for rec in records}


def chosen_text(records: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"{label}: trial {r['chosen_trial']} ({r['metric']} {r['chosen_value']:.4f}) "
                     + json.dumps(r["chosen"]) for label, r in records.items())
