"""`mmbalance tune SWEEP.yaml`: the same tuning budget for every cell of a sweep, its trials run by
the sweep's launcher (inline, local processes or SLURM arrays).

For each cell (a row label of the sweep), an Optuna study searches the method's declared space
(the Params fields made with `core.params.tunable`) and the optimiser's lr (`tune.lr_range`, log
scale; a method with nothing tunable tunes lr only) with `tune.trials` trials. A trial is one
normal run on the sweep's first seed, stored at `results/<group>/tuning/<cell>/<run id>`, and
scored by its best-validation value; the test split is never read. The chosen configuration (the
best completed trial) is then run over every seed of the sweep as `<cell>-tuned`, beside the
sweep's default runs, which `tune` runs too, all through the same launcher.

The driver asks each study for trials until `parallel` of the cell's are in flight (seeded TPE
with the constant liar, so that trials asked together differ) and hands them to the launcher as
ordinary runs (their configs carry a `trial:` link, bench.trial). When trial runs end, each study
is told how, read from the store (a finished run's best validation value; a failed run's failure,
counted: the budget was spent), and asked again: by default once the whole round has ended (one
launch, on SLURM one job array, per round: the same trials on a rerun), or with `schedule: asap`
(inline and local launchers) as soon as each run ends, its cell's next trial joining the running
launch so that no worker waits for the slowest run of a round. The runs themselves report
validation after every epoch and end as `pruned` when the study's median pruner says so. It goes
on until every study has its budget of counted trials.

A study lives in `results/<group>/tuning/<cell>.journal` (Optuna's journal file, which many
processes and nodes may write at once), so a killed `tune` resumes: finished and pruned trials
stay, a trial whose run was cut short stays in flight and its run resumes from its checkpoint, and
only the trials still missing are asked. `<cell>.json` beside it is what the report reads
(bench.report.tuning: the report imports no Optuna). One `tune` per group at a time (a lock).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.launch import launch
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import label as row_label
from mmbalance.bench.store import RunDir, Store, atomic_write_json
from mmbalance.bench.trial import TrialLink, journal
from mmbalance.bench.tune_options import TuneOptions, check_schedule
from mmbalance.core.errors import ConfigError, RunFailed
from mmbalance.core.params import Range, search_space
from mmbalance.core.registry import METHODS

log = logging.getLogger(__name__)

LR = "optim.lr"  # the trial parameter that is the optimiser's lr (method parameters: their field names)
TUNED = "-tuned"  # suffix of the tuned cell's label
FAILED_RUN = "run_failed"  # user attr of a trial whose run failed (it counts: the budget was spent)
RUN_ID = "run_id"  # user attr: the trial's run in the tuning store
STUDY_SUFFIX = ".journal"
SLURM_PARALLEL = 4  # a cell's trials in flight on SLURM when the sweep does not say


@dataclass
class Cell:
    """One cell of the sweep on one dataset (a label may span datasets, as the quickstart's two
    blocks do; each dataset is tuned on its own): its row label, the dataset's config (JSON, as the
    report keys datasets), a file-safe name unique in the sweep and its run config per seed."""

    label: str
    dataset: str
    name: str
    seeds: list[RunConfig]

    def space(self, options: TuneOptions) -> dict[str, Range]:
        method = self.seeds[0].method  # resolved: every field's value (bench.config.resolve_named)
        return {**search_space(METHODS.get(method["name"]).Params, method), LR: options.lr()}

    @property
    def metric(self) -> str:
        return self.seeds[0].eval.select_metric


def cells_of(configs: Sequence[RunConfig]) -> list[Cell]:
    """One cell per (label, dataset) in the sweep's order; named after its label, and after its
    dataset too where the label spans several."""
    from mmbalance.bench.naming import dataset_key, dataset_labels

    groups: dict[tuple[str, str], list[RunConfig]] = {}
    for cfg in configs:
        groups.setdefault((row_label(cfg), dataset_key(cfg.dataset)), []).append(cfg)
    shown = dataset_labels([ds for _, ds in groups])
    spans = Counter(lab for lab, _ in groups)
    return [Cell(lab, ds, re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{lab}@{shown[ds]}" if spans[lab] > 1 else lab).strip("_"),
                 seeds) for (lab, ds), seeds in groups.items()]


def with_params(cfg: RunConfig, params: dict[str, Any], group: str, label: str,
                link: TrialLink | None = None) -> RunConfig:
    """`cfg` with a trial's parameters (method fields, and LR), in `group` under `label`."""
    data = cfg.to_dict()
    data["method"].update({k: v for k, v in params.items() if k != LR})
    data["optim"]["lr"] = params[LR]
    data.update(group=group, label=label, trial=link.model_dump() if link else None)
    return validate(data)


def suggest(trial: Any, space: dict[str, Range]) -> dict[str, Any]:
    return {name: (trial.suggest_int(name, int(r.low), int(r.high), log=r.log) if r.integer
                   else trial.suggest_float(name, r.low, r.high, log=r.log)) for name, r in space.items()}


def tuning_dir(store: Store, group: str) -> Path:
    return store.root / group / "tuning"


@dataclass
class Study:
    """A cell's study: the cell, its Optuna study and journal file, and the store of its trial runs."""

    cell: Cell
    study: Any
    path: Path
    trials: Store
    options: TuneOptions

    def run_dir(self, params: dict[str, Any]) -> RunDir:
        cfg = with_params(self.cell.seeds[0], params, self.cell.name, "")
        return self.trials.run_dir(cfg.group, cfg.run_id())

    def config(self, trial: Any) -> RunConfig:
        """The run of a trial in flight, linked to it (bench.trial)."""
        link = TrialLink(storage=str(self.path.resolve()), study=self.study.study_name, trial_id=trial._trial_id,
                         number=trial.number, startup_trials=self.options.startup_trials,
                         warmup_epochs=self.options.warmup(self.cell.seeds[0].train.epochs))
        return with_params(self.cell.seeds[0], trial.params, self.cell.name, f"{self.cell.label}/trial", link)

    def in_flight(self) -> list[Any]:
        from optuna.trial import TrialState

        return [t for t in self.study.trials if t.state == TrialState.RUNNING]

    def spent(self) -> int:
        return sum(counted(t) for t in self.study.trials)


def study_path(store: Store, cell: Cell) -> Path:
    return tuning_dir(store, cell.seeds[0].group) / f"{cell.name}{STUDY_SUFFIX}"


def open_study(cell: Cell, store: Store, options: TuneOptions) -> Study:
    import optuna

    path = study_path(store, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=cell.name, storage=journal(path), load_if_exists=True,
                                direction="maximize")
    return Study(cell, study, path, Store(path.parent), options)


def counted(trial: Any) -> bool:
    """A trial that spent its share of the budget: completed, pruned, or its run failed."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and FAILED_RUN in trial.user_attrs)


def trial_value(run_dir: RunDir, metric: str) -> float:
    """A finished trial's score: its best-validation value (the summary's test numbers are not read)."""
    return float(run_dir.read_summary()["best_val"]["val"][metric])


def settle(s: Study) -> None:
    """Tell the study how its trials in flight ended, from their runs in the store; a trial whose
    run has not ended stays in flight (its run is launched again, and resumes)."""
    import optuna
    from optuna.trial import TrialState

    for t in s.in_flight():
        if set(t.params) != set(s.cell.space(s.options)):  # asked, but the driver died before it suggested
            s.study.tell(t.number, state=TrialState.FAIL)
            continue
        rd = s.run_dir(t.params)
        state = rd.recorded_status()["state"]
        if rd.done():
            s.study.tell(t.number, trial_value(rd, s.cell.metric))
        elif state == "pruned":  # its run told the study; this is for a tell the run did not get to
            s.study.tell(t.number, state=TrialState.PRUNED, skip_if_finished=True)
        elif state == "failed":
            optuna.trial.Trial(s.study, t._trial_id).set_user_attr(FAILED_RUN, rd.status().get("error", "failed"))
            s.study.tell(t.number, state=TrialState.FAIL)


def ask(s: Study, parallel: int) -> None:
    """Ask for trials until `parallel` are in flight, within the budget; record each one's run id."""
    import optuna

    flying = len(s.in_flight())
    room = min(parallel - flying, s.options.trials - s.spent() - flying)
    if room <= 0:
        return
    # seeded by the trials already there: a resumed study would otherwise ask its first points again
    s.study.sampler = optuna.samplers.TPESampler(seed=s.options.sampler_seed + len(s.study.trials),
                                                 n_startup_trials=s.options.startup_trials, constant_liar=True)
    for _ in range(room):
        trial = s.study.ask()
        params = suggest(trial, s.cell.space(s.options))
        trial.set_user_attr(RUN_ID, s.run_dir(params).run_id)


def default_parallel(launcher: LauncherConfig, cells: int) -> int:
    """A cell's trials in flight when the sweep does not say: one inline; on the local launcher,
    its workers shared by the cells; SLURM_PARALLEL on SLURM."""
    if launcher.name == "inline":
        return 1
    if launcher.name == "slurm":
        return SLURM_PARALLEL
    from mmbalance.bench.launch.local import gpu_count
    from mmbalance.bench.threads import cpu_share

    workers = launcher.workers or (gpu_count() * launcher.packing()) or launcher.runs_per_gpu or cpu_share()
    return max(1, math.ceil(workers / cells))


def run_studies(studies: Sequence[Study], launcher: LauncherConfig) -> None:
    """Ask, launch and settle until every study has spent its budget: in rounds (each round's
    trials one launch; on SLURM one job array), or, with `schedule: asap`, a cell's next trial
    asked as soon as one of its trial runs ends and started in the same launch (next_trials)."""
    parallel = studies[0].options.parallel or default_parallel(launcher, len(studies))
    for s in studies:
        settle(s)  # what ended while no driver watched (a resumed tune)
    while True:
        for s in studies:
            ask(s, parallel)
        flight = {cfg.run_id(): (s, cfg) for s in studies for cfg in map(s.config, s.in_flight())}
        if not flight:
            return
        log.info(f"tuning: {len(flight)} trial run(s) of {len(studies)} cell(s); budget "
                 + ", ".join(f"{s.cell.name} {s.spent()}/{s.options.trials}" for s in studies))
        follow = next_trials(flight, parallel) if studies[0].options.schedule == "asap" else None
        launch([cfg for _, cfg in flight.values()], studies[0].trials, launcher, wait=True, follow=follow)
        for s in studies:
            settle(s)
        stuck = [(s, s.config(t)) for s in studies for t in s.in_flight()]  # every one was launched
        if stuck:
            raise RunFailed(stuck_line(stuck))


def next_trials(flight: dict[str, tuple[Study, RunConfig]], parallel: int) -> Callable[[str], list[RunConfig]]:
    """What a launch runs next once a run of it ends: for a trial run, its study is told how it
    ended and asked for trials up to `parallel` in flight, within the budget; the new trials'
    runs. A run that is not a trial (a teacher a trial requires) adds nothing."""
    study_of = {run_id: s for run_id, (s, _) in flight.items()}

    def follow(run_id: str) -> list[RunConfig]:
        s = study_of.get(run_id)
        if s is None:
            return []
        settle(s)
        ask(s, parallel)
        new = [cfg for cfg in map(s.config, s.in_flight()) if cfg.run_id() not in study_of]
        study_of.update((cfg.run_id(), s) for cfg in new)
        log.info(f"tuning {s.cell.name}: {s.spent()}/{s.options.trials} trial(s) spent"
                 + (f", {len(new)} more started" if new else ""))
        return new

    return follow


def stuck_line(stuck: Sequence[tuple[Study, RunConfig]]) -> str:
    """Trial runs the launch left neither finished, pruned nor failed (interrupted, cancelled,
    held by another process): the tuning stops, and running it again resumes them."""
    lines = [f"  {s.cell.name} trial run {cfg.run_id()}: "
             f"{s.trials.run_dir(cfg.group, cfg.run_id()).recorded_status()['state']}" for s, cfg in stuck]
    return "\n".join([f"{len(stuck)} trial run(s) did not end; run `mmbalance tune` again to resume them", *lines])


def study_record(s: Study) -> dict[str, Any]:
    """What the report reads: every counted trial in order, the chosen parameters and both labels."""
    done = [t for t in s.study.trials if counted(t)]
    complete = [t for t in done if t.value is not None and t.state.name == "COMPLETE"]
    if not complete:
        raise RunFailed(f"tuning {s.cell.label!r}: none of its {len(done)} trials completed; nothing to choose "
                        f"(their runs: {s.trials.root / s.cell.name})")
    best = max(complete, key=lambda t: (t.value, -t.number))  # the earliest of equal values
    return {
        "label": s.cell.label, "tuned_label": s.cell.label + TUNED, "method": s.cell.seeds[0].method["name"],
        "dataset_config": s.cell.dataset,
        "metric": f"best val {s.cell.metric}", "trials_budget": s.options.trials,
        "space": {k: r.model_dump() for k, r in s.cell.space(s.options).items()},
        "chosen": best.params, "chosen_trial": best.number, "chosen_value": best.value,
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                    "run_id": t.user_attrs.get(RUN_ID)} for t in done],
    }


def tuned_configs(cell: Cell, chosen: dict[str, Any]) -> list[RunConfig]:
    return [with_params(cfg, chosen, cfg.group, cell.label + TUNED) for cfg in cell.seeds]


@contextmanager
def tuning_lock(folder: Path) -> Iterator[None]:
    """One `tune` per group: two drivers would both ask trials and overspend the budget."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tune.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ConfigError(f"another `mmbalance tune` is tuning this group ({f.read().strip() or 'pid unknown'}; "
                              f"lock {path}); wait for it, or stop it and run this again") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield


@dataclass
class Tuned:
    configs: list[RunConfig]  # the sweep's runs and its tuned cells' runs
    records: dict[str, dict[str, Any]]  # each cell's study record, by cell name
    code: int  # the last launch's: 0 when every default and tuned run finished


def tune(configs: Sequence[RunConfig], store: Store, options: TuneOptions, launcher: LauncherConfig) -> Tuned:
    """Tune every cell of a sweep's `configs`, then run its default and tuned runs."""
    check_schedule(options, launcher.name)
    cells = cells_of(configs)
    with tuning_lock(tuning_dir(store, configs[0].group)):
        studies = [open_study(cell, store, options) for cell in cells]
        run_studies(studies, launcher)
        records = [study_record(s) for s in studies]
        for s, rec in zip(studies, records):
            atomic_write_json(s.path.with_suffix(".json"), rec)
    tuned = [cfg for cell, rec in zip(cells, records) for cfg in tuned_configs(cell, rec["chosen"])]
    warn_of_earlier_choices(store, tuned)
    code = launch([*configs, *tuned], store, launcher, wait=True)
    return Tuned([*configs, *tuned], {cell.name: rec for cell, rec in zip(cells, records)}, code)


def warn_of_earlier_choices(store: Store, tuned: Sequence[RunConfig]) -> None:
    """A study given more trials may choose again: the tuned runs of its earlier choice stay in the
    store under the same label, and a report of the whole group would average both choices."""
    from mmbalance.bench.store import run_dirs

    labels, ids = {cfg.label for cfg in tuned}, {cfg.run_id() for cfg in tuned}
    group = store.root / tuned[0].group
    stale = [rd for rd in run_dirs(group) if rd.run_id not in ids and rd.read_config().get("label") in labels]
    if stale:
        log.warning(f"{len(stale)} run(s) in {group} are tuned runs of an earlier choice (a study that was given more "
                    f"trials chose again): {', '.join(sorted(rd.run_id for rd in stale))}; `mmbalance report` on the "
                    "group would average them with this choice's runs under one label: move them out of the group")


def range_text(r: Range) -> str:
    kind = ", int" if r.integer else ""
    return f"[{r.low:g}, {r.high:g}]{' log' if r.log else ''}{kind}"


def spent_so_far(store: Store, cell: Cell) -> int:
    """Counted trials of the cell's study, read without creating it (0 when there is none)."""
    path = study_path(store, cell)
    if not path.exists():
        return 0
    import optuna

    return sum(counted(t) for t in optuna.load_study(study_name=cell.name, storage=journal(path)).trials)


def plan_text(configs: Sequence[RunConfig], store: Store, options: TuneOptions, launcher: LauncherConfig) -> str:
    """What `tune` would do, for --dry-run: each cell's search space and the trials it has spent."""
    cells = cells_of(configs)
    parallel = options.parallel or default_parallel(launcher, len(cells))
    asked = "in rounds" if options.schedule == "rounds" else "as each trial run ends"
    lines = [f"{options.trials} trials per cell, {parallel} in flight per cell ({launcher.name} launcher), asked "
             f"{asked}, chosen on validation; then {len(cells[0].seeds)} seed(s) per cell, default and -tuned; "
             f"studies in {tuning_dir(store, configs[0].group)}"]
    for cell in cells:
        space = ", ".join(f"{name} {range_text(r)}" for name, r in cell.space(options).items())
        lines.append(f"  {cell.name} ({cell.seeds[0].method['name']}): {spent_so_far(store, cell)}/{options.trials} "
                     f"spent; searches {space}")
    return "\n".join(lines)


def chosen_text(records: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"{name}: trial {r['chosen_trial']} ({r['metric']} {r['chosen_value']:.4f}) "
                     + json.dumps(r["chosen"]) for name, r in records.items())
