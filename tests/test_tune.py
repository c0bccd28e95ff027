"""`mmbalance tune`: equal trials per cell, selection on validation only, resume after a kill,
tuned runs over the seeds, the report's Tuning section, and the Params ranges."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from pydantic import ValidationError

from mmbalance.bench.report.build import build_report
from mmbalance.bench.store import Store, run_dirs
from mmbalance.bench.sweep import load_sweep
from mmbalance.bench.tune import cells_of, counted, open_study, tune, tune_cell, tune_options
from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Range, Strict, search_space, tunable
from mmbalance.core.registry import METHODS

pytest.importorskip("optuna")

SWEEP = """
group: t
base:
  dataset: {name: gaussian}
  train: {epochs: 2, batch_size: 32, progress: false, checkpoint_every: 1, tensorboard: false}
  eval: {probe: false}
seeds: [0, 1]
cells:
  joint: {method.name: joint}
  ogm-ge: {method.name: ogm_ge}
"""


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def records(store: Store) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (store.root / "t" / "tuning").glob("*.json")}


def test_equal_trials_tuned_runs_and_report(sweep, store, tmp_path, one_torch_thread):
    configs, recs = tune(sweep, [], store, tune_options(trials=3))
    assert {label: len(r["trials"]) for label, r in recs.items()} == {"joint": 3, "ogm-ge": 3}
    assert set(recs["ogm-ge"]["chosen"]) == {"alpha", "optim.lr"} and set(recs["joint"]["chosen"]) == {"optim.lr"}
    # the tuned cells over both seeds, with the chosen parameters, beside the defaults
    rows = [rd.read_config() for rd in run_dirs(store.root / "t")]
    tuned = [c for c in rows if c["label"] == "ogm-ge-tuned"]
    assert sorted(c["train"]["seed"] for c in tuned) == [0, 1]
    assert all(c["method"]["alpha"] == recs["ogm-ge"]["chosen"]["alpha"]
               and c["optim"]["lr"] == recs["ogm-ge"]["chosen"]["optim.lr"] for c in tuned)
    assert {c["label"] for c in rows} == {"joint", "ogm-ge", "joint-tuned", "ogm-ge-tuned"}  # no trial rows
    report = build_report(store.root / "t", tmp_path / "report")
    text = (tmp_path / "report" / "tuning.md").read_text()
    assert "## Tuning" in text and "ogm-ge" in text and "alpha=" in text
    assert (tmp_path / "report" / "figures" / "tuning_search.png").stat().st_size > 0
    assert "## Tuning" in (tmp_path / "report" / "README.md").read_text()
    assert any(p.name == "tuning.csv" for p in report.files)


def test_selection_uses_validation_only(sweep, store, monkeypatch, one_torch_thread):
    """Trial runs whose val and test ranks disagree: the chosen trial is the val-best one."""
    from mmbalance.bench import tune as tune_module

    real_run = tune_module.run
    val, test = iter([0.5, 0.9, 0.7]), iter([0.95, 0.1, 0.2])  # test-best: trial 0; val-best: trial 1

    def run_with(cfg, store, datasets, on_epoch=None):
        result = real_run(cfg, store, datasets, on_epoch=on_epoch)
        result.summary["best_val"] = {**result.summary["best_val"], "val": {"acc": next(val)},
                                      "test": {"acc": next(test)}}
        return result

    monkeypatch.setattr(tune_module, "run", run_with)
    _, configs = load_sweep(sweep)
    rec = tune_cell(cells_of(configs)[0], store, tune_options(trials=3))
    assert rec["chosen_trial"] == 1 and rec["chosen_value"] == 0.9


def test_study_resumes_after_a_kill(sweep, store, one_torch_thread):
    _, configs = load_sweep(sweep)
    cell = cells_of(configs)[1]
    options = tune_options(trials=4)

    def kill_after_two(study, trial):
        if trial.number == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_cell(cell, store, options, callbacks=[kill_after_two])
    study = open_study(store.root / "t" / "tuning" / f"{cell.name}.db", options)
    before = [(t.number, t.params, t.value) for t in study.trials if counted(t)]
    assert len(before) == 2
    rec = tune_cell(cell, store, options)
    assert len(rec["trials"]) == 4
    assert [(t["number"], t["params"], t["value"]) for t in rec["trials"][:2]] == before
    # the finished trial runs were not trained again: one run directory per trial
    assert len(list((store.root / "t" / "tuning" / cell.name).iterdir())) == 4


def test_a_trial_cut_short_is_asked_again_and_its_run_resumes(sweep, store, monkeypatch, one_torch_thread):
    from mmbalance.bench import tune as tune_module

    _, configs = load_sweep(sweep)
    cell = cells_of(configs)[0]
    options = tune_options(trials=2)
    real_run = tune_module.run

    def interrupted(cfg, store, datasets, on_epoch=None):
        def stop(epoch, record):
            raise KeyboardInterrupt
        return real_run(cfg, store, datasets, on_epoch=stop)

    monkeypatch.setattr(tune_module, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune_cell(cell, store, options)
    monkeypatch.undo()
    [cut] = list((store.root / "t" / "tuning" / cell.name).iterdir())
    rec = tune_cell(cell, store, options)
    assert len(rec["trials"]) == 2 and rec["trials"][0]["run_id"] == cut.name  # the same config, resumed
    assert json.loads((cut / "status.json").read_text())["state"] == "finished"


def test_ranges_are_declared_and_validated():
    assert search_space(METHODS.get("ogm_ge").Params)["alpha"] == Range(low=0.05, high=1.5)
    for name in ("ogm_ge", "mla", "mie", "agm", "pmr", "opm", "mmcosine", "cml"):
        assert search_space(METHODS.get(name).Params), name
    assert search_space(METHODS.get("joint").Params) == {}
    with pytest.raises(ValueError, match="outside its search range"):
        tunable(2.0, 0.1, 1.0)
    with pytest.raises(ValidationError, match="low < high"):
        tunable(0.5, 1.0, 0.1)
    with pytest.raises(ValidationError, match="log-scale"):
        tunable(0.5, 0.0, 1.0, log=True)

    class P(Strict):
        k: int = tunable(3, 1, 8)

    assert search_space(P)["k"].integer and P().k == 3
    with pytest.raises(ConfigError, match="lr_low"):
        tune_options(trials=2, lr_low=0.1, lr_high=0.01)


# Methods that declare no search range (only the optimiser's lr is tuned for them), each with its reason
UNTUNED = {
    "joint": "the baseline: nothing but the optimiser",
    "unimodal": "the baseline: nothing but the optimiser",
    "ume": "unimodal ensemble: trains the unimodal baselines, no coefficient of its own",
    "mbsd": "its only parameters are the window's epochs; the loss terms have no weight in the release",
    "lfm": "its default (fitted) schedule has no coefficient and refuses the learned and fixed schedules' "
           "(align_weight, lr_alpha), so a declared range would fail every trial of a default cell",
}
REQUIRED = {"mie": {"epoch_list": [2]}}  # Params fields without a default


def at_ends(space: dict[str, Range], end: str) -> dict[str, float | int]:
    return {f: int(getattr(r, end)) if r.integer else getattr(r, end) for f, r in space.items()}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_ranges_that_validate(name):
    """Every method but the exceptions declares a range; under each variant its defaults lie in
    the ranges, and a Params with every searched field at its low (high) end validates, as a
    trial sets them all at once."""
    params = METHODS.get(name).Params
    space = search_space(params)
    if name in UNTUNED:
        assert space == {}, f"{name} declares ranges now: drop it from UNTUNED"
        return
    assert space, f"{name} declares no tunable field"
    variant = params.model_fields.get("variant")
    for given in ({"variant": v} for v in get_args(variant.annotation)) if variant else [{}]:
        base = {**REQUIRED.get(name, {}), **given}
        defaults = params.model_validate(base)
        ends = [at_ends(space, "low"), at_ends(space, "high")]
        for field, r in space.items():
            value = getattr(defaults, field)
            assert value is None or r.low <= value <= r.high, (given, field, value, r)
            for end in ends:
                assert getattr(params.model_validate({**base, field: end[field]}), field) == end[field]
        for end in ends:
            params.model_validate({**base, **end})
