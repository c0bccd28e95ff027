"""`mmbalance tune`: equal trials per cell through the sweep's launcher, selection on validation
only, pruned runs, resume after a kill, tuned runs over the seeds, the report's Tuning section,
the sweep file's `tune:` section and the Params ranges."""

from __future__ import annotations

import json
from typing import get_args

import pytest
from pydantic import ValidationError

from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.report.build import build_report
from mmbalance.bench.store import Store, run_dirs
from mmbalance.bench.sweep import load_sweep
from mmbalance.bench.tune import (
    cells_of,
    default_parallel,
    open_study,
    study_record,
    trial_value,
    tune,
    tuned_configs,
)
from mmbalance.bench.tune_options import TuneOptions, tune_options
from mmbalance.core.errors import ConfigError, RunFailed
from mmbalance.core.params import Range, Strict, search_space, tunable
from mmbalance.core.registry import METHODS
from tests.conftest import as_at_a_terminal

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
INLINE = LauncherConfig()


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


def options(trials: int, **more) -> TuneOptions:
    return tune_options(None, {"trials": trials, **more})


def studies(store: Store, cells) -> dict[str, list]:
    """Each cell's trials as Optuna has them (state name, value, params)."""
    opts = options(1)
    return {c.label: [(t.state.name, t.value, t.params) for t in open_study(c, store, opts).study.trials]
            for c in cells}


def test_equal_trials_tuned_runs_and_report(sweep, store, tmp_path, one_torch_thread):
    _, configs = load_sweep(sweep)
    tuned = tune(configs, store, options(3), INLINE)
    recs = tuned.records
    assert tuned.code == 0
    assert {label: len(r["trials"]) for label, r in recs.items()} == {"joint": 3, "ogm-ge": 3}
    assert set(recs["ogm-ge"]["chosen"]) == {"alpha", "optim.lr"} and set(recs["joint"]["chosen"]) == {"optim.lr"}
    # the tuned cells over both seeds, with the chosen parameters, beside the defaults
    rows = [rd.read_config() for rd in run_dirs(store.root / "t")]
    tuned_rows = [c for c in rows if c["label"] == "ogm-ge-tuned"]
    assert sorted(c["train"]["seed"] for c in tuned_rows) == [0, 1]
    assert all(c["method"]["alpha"] == recs["ogm-ge"]["chosen"]["alpha"]
               and c["optim"]["lr"] == recs["ogm-ge"]["chosen"]["optim.lr"] and c["trial"] is None for c in tuned_rows)
    assert {c["label"] for c in rows} == {"joint", "ogm-ge", "joint-tuned", "ogm-ge-tuned"}  # no trial rows
    # each trial's run carries its link; the chosen value is the best of the trial runs' validation values
    for cell in cells_of(configs):
        trial_dirs = run_dirs(store.root / "t" / "tuning" / cell.name)
        assert sorted(rd.read_config()["trial"]["number"] for rd in trial_dirs) == [0, 1, 2]
        assert {rd.read_config()["trial"]["warmup_epochs"] for rd in trial_dirs} == {1}  # half of 2 epochs
        finished = [trial_value(rd, "acc") for rd in trial_dirs if rd.done()]
        assert recs[cell.label]["chosen_value"] == max(finished)
    report = build_report(store.root / "t", tmp_path / "report")
    text = (tmp_path / "report" / "tuning.md").read_text()
    assert "## Tuning" in text and "ogm-ge" in text and "alpha=" in text
    assert (tmp_path / "report" / "figures" / "tuning_search.png").stat().st_size > 0
    assert "## Tuning" in (tmp_path / "report" / "README.md").read_text()
    assert any(p.name == "tuning.csv" for p in report.files)
    # a second tune spends nothing: every study has its budget
    again = tune(configs, store, options(3), INLINE)
    assert again.records == recs


def test_a_larger_budget_asks_only_the_missing_trials_and_warns_of_an_earlier_choice(sweep, store, logged,
                                                                                      one_torch_thread):
    _, configs = load_sweep(sweep)
    joint = [c for c in configs if c.label == "joint"]
    first = tune(joint, store, options(2), INLINE).records["joint"]
    more = tune(joint, store, options(5), INLINE).records["joint"]
    assert [t["params"] for t in more["trials"][:2]] == [t["params"] for t in first["trials"]]
    assert len(more["trials"]) == 5 and len(run_dirs(store.root / "t" / "tuning" / "joint")) == 5
    assert more["chosen"] != first["chosen"], "the seeded search is expected to choose again here"
    stale = {c.run_id() for c in tuned_configs(cells_of(joint)[0], first["chosen"])}
    assert f"2 run(s) in {store.root / 't'} are tuned runs of an earlier choice" in logged.read()
    assert stale <= {rd.run_id for rd in run_dirs(store.root / "t")}  # named, never removed


def test_a_label_over_two_datasets_is_tuned_on_each(tmp_path, store, one_torch_thread):
    """The quickstart's shape: one row label on two datasets. Each dataset is a cell of its own,
    with its own study, trials on its own data, its tuned runs and its row in the Tuning table."""
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "  ogm-ge: {method.name: ogm_ge}\n",
        "  joint-hard: {label: joint, method.name: joint, dataset.separation_audio: 0.5}\n"))
    _, configs = load_sweep(path)
    cells = cells_of(configs)
    assert [c.name for c in cells] == ["joint_gaussian_separation_audio_2.0", "joint_gaussian_separation_audio_0.5"]
    tuned = tune(configs, store, options(2), INLINE)
    assert set(tuned.records) == {c.name for c in cells}
    for cell in cells:  # every trial trained on its cell's dataset
        trial_cfgs = [rd.read_config() for rd in run_dirs(store.root / "t" / "tuning" / cell.name)]
        assert len(trial_cfgs) == 2 and all(c["dataset"] == cells_dataset(cell) for c in trial_cfgs)
    rows = [rd.read_config() for rd in run_dirs(store.root / "t")]
    for cell in cells:  # the tuned run of each dataset has that dataset's chosen lr
        [tuned_row] = [c for c in rows if c["label"] == "joint-tuned" and c["dataset"] == cells_dataset(cell)]
        assert tuned_row["optim"]["lr"] == tuned.records[cell.name]["chosen"]["optim.lr"]
    build_report(store.root / "t", tmp_path / "report")
    table = (tmp_path / "report" / "tuning.csv").read_text().splitlines()
    assert sorted(row.split(",")[:2] for row in table[1:]) == [
        ["gaussian (separation_audio=0.5)", "joint"], ["gaussian (separation_audio=2.0)", "joint"]]


def cells_dataset(cell) -> dict:
    return json.loads(cell.dataset)


@pytest.mark.parametrize("schedule", ["rounds", "asap"])
def test_a_trial_of_a_method_that_needs_teachers_trains_them_unlinked(schedule, tmp_path, store, one_torch_thread):
    """UMT's trials need unimodal teachers trained first (with the trial's lr: the same config
    otherwise). They are runs of the tuning store too, but not the trial: they do not report to
    its study, so the pruner judges the UMT run alone. Under `asap`, the second trial and its
    teachers join the launch when the first trial has ended."""
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("seeds: [0, 1]", "seeds: [0]").replace("  joint: {method.name: joint}\n", "")
                    .replace("ogm-ge: {method.name: ogm_ge}", "umt: {method.name: umt}"))
    _, configs = load_sweep(path)
    tuned = tune(configs, store, options(2, schedule=schedule), INLINE)
    assert [t["state"] for t in tuned.records["umt"]["trials"]] == ["COMPLETE", "COMPLETE"]
    runs = [rd.read_config() for rd in run_dirs(store.root / "t" / "tuning" / "umt")]
    teachers = [c for c in runs if c["method"]["name"] == "unimodal"]
    assert len(teachers) == 4 and all(c["trial"] is None for c in teachers)  # 2 modalities x 2 trials' lrs
    assert sorted(c["trial"]["number"] for c in runs if c["method"]["name"] == "umt") == [0, 1]


def test_the_score_is_the_validation_value_never_test(store):
    rd = store.run_dir("g", "joint-000000000000")
    rd.path.mkdir(parents=True)
    val_best = {"epoch": 1, "val": {"acc": 0.5}, "test": {"acc": 0.6}}
    test_best = {"epoch": 0, "val": {"acc": 0.4}, "test": {"acc": 0.9}}
    rd.summary.write_text(json.dumps({"epochs": 2, "best_val": val_best, "best_test": test_best, "last": val_best}))
    assert trial_value(rd, "acc") == 0.5


def test_pruned_runs_are_final_and_counted(tmp_path, store, one_torch_thread):
    """With pruning from the first finished trial on, later trials below the median end `pruned`
    (their runs say so; launching again leaves them) and count in the budget."""
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("epochs: 2", "epochs: 4").replace("seeds: [0, 1]", "seeds: [0]"))
    _, configs = load_sweep(path)
    tuned = tune([c for c in configs if c.label == "joint"], store, options(6, startup_trials=1, warmup_epochs=0),
                 INLINE)
    states = [t["state"] for t in tuned.records["joint"]["trials"]]
    assert len(states) == 6 and "PRUNED" in states, states
    pruned = [rd for rd in run_dirs(store.root / "t" / "tuning" / "joint") if rd.status()["state"] == "pruned"]
    assert pruned and "pruned after epoch" in pruned[0].status()["error"]
    from mmbalance.bench.launch.plan import plan

    assert {p.state for p in plan([c for c in configs if c.label == "joint"], store)} == {"finished"}


def test_a_kill_loses_no_trial_and_the_cut_run_resumes(sweep, store, monkeypatch, one_torch_thread):
    """Ctrl-C in the middle of a trial's run: the finished trials stay, the cut trial stays in
    flight, and the next tune resumes its run from its checkpoint instead of asking again."""
    from mmbalance.bench import trial as trial_module

    _, configs = load_sweep(sweep)
    ogm = [c for c in configs if c.label == "ogm-ge"]
    real = trial_module.epoch_reporter

    def killing(link, metric):
        report = real(link, metric)

        def stop(epoch, record):
            report(epoch, record)
            if link.number == 2 and epoch == 0:
                raise KeyboardInterrupt

        return stop

    monkeypatch.setattr(trial_module, "epoch_reporter", killing)
    with pytest.raises(KeyboardInterrupt):
        tune(ogm, store, options(4), INLINE)
    monkeypatch.undo()
    [cell] = cells_of(ogm)
    before = studies(store, [cell])["ogm-ge"]
    assert [s for s, _, _ in before] == ["COMPLETE", "COMPLETE", "RUNNING"]
    cut = [rd for rd in run_dirs(store.root / "t" / "tuning" / "ogm-ge") if rd.status()["state"] == "interrupted"]
    assert len(cut) == 1 and cut[0].checkpoint.exists()
    rec = tune(ogm, store, options(4), INLINE).records["ogm-ge"]
    assert len(rec["trials"]) == 4
    assert [(t["state"], t["value"], t["params"]) for t in rec["trials"][:2]] == before[:2]
    assert rec["trials"][2]["params"] == before[2][2] and rec["trials"][2]["run_id"] == cut[0].run_id
    assert cut[0].status()["state"] in ("finished", "pruned")
    assert len(cut[0].read_metrics()) in (1, 2)  # epoch 0 was not trained twice: one record per epoch
    assert len(run_dirs(store.root / "t" / "tuning" / "ogm-ge")) == 4  # one run per trial, none again


def test_a_trial_run_that_does_not_end_stops_the_tuning_with_its_state(sweep, store, monkeypatch,
                                                                       one_torch_thread):
    from mmbalance.bench import tune as tune_module

    _, configs = load_sweep(sweep)
    monkeypatch.setattr(tune_module, "launch", lambda *a, **k: 0)  # a launch that ran nothing
    with pytest.raises(RunFailed, match=r"1 trial run\(s\) did not end.*\n  joint trial run joint-\w+: new"):
        tune([c for c in configs if c.label == "joint"], store, options(2), INLINE)


def test_the_sweep_files_tune_section_and_the_flags_over_it(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP + "tune: {trials: 5, lr_range: [0.001, 0.5], parallel: 2}\n")
    sweep, _ = load_sweep(path)
    assert tune_options(sweep.tune, {}).model_dump() == {
        "trials": 5, "lr_range": (0.001, 0.5), "parallel": 2, "sampler_seed": 0, "startup_trials": 3,
        "warmup_epochs": None, "schedule": "rounds"}
    assert tune_options(sweep.tune, {"schedule": "asap"}).schedule == "asap"
    with pytest.raises(ConfigError, match=r"tune.schedule.*the command line"):
        tune_options(sweep.tune, {"schedule": "eager"})
    assert (sweep.tune.warmup(40), tune_options(sweep.tune, {"warmup_epochs": 3}).warmup(40)) == (20, 3)
    assert tune_options(sweep.tune, {"trials": 7, "lr_range": None}).trials == 7
    with pytest.raises(ConfigError, match="no tuning budget: give `--trials N` or `tune: {trials: N}`"):
        tune_options(None, {})
    with pytest.raises(ConfigError, match=r"tune.trials.*the command line"):
        tune_options(sweep.tune, {"trials": 0})
    path.write_text(SWEEP + "tune: {trials: 5, lr_range: [0.5, 0.001]}\n")
    with pytest.raises(ConfigError, match=r"tune.*lr_range \[0.5, 0.001\]: a search range needs low < high"):
        load_sweep(path)
    path.write_text(SWEEP + "tune: {trails: 5}\n")
    with pytest.raises(ConfigError, match="trails"):
        load_sweep(path)


def test_dry_run_shows_each_cells_space_and_spent_trials_and_writes_nothing(sweep, tmp_path, capsys):
    from mmbalance.bench.cli import main as cli

    root = tmp_path / "results"
    assert cli(["--results", str(root), "tune", str(sweep), "--trials", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("5 trials per cell, 1 in flight per cell (inline launcher), asked in rounds, chosen on "
                             "validation; then 2 seed(s) per cell")
    assert out[1:] == ["  joint (joint): 0/5 spent; searches optim.lr [0.0001, 0.1] log",
                       "  ogm-ge (ogm_ge): 0/5 spent; searches alpha [0.05, 1.5], optim.lr [0.0001, 0.1] log"]
    assert not root.exists()
    assert cli(["--results", str(root), "tune", str(sweep), "--trials", "5", "--schedule", "asap", "--dry-run"]) == 0
    assert "1 in flight per cell (inline launcher), asked as each trial run ends," in capsys.readouterr().out
    assert cli(["--results", str(root), "tune", str(sweep), "--dry-run"]) == 2  # no budget: one line
    assert "no tuning budget: give `--trials N`" in capsys.readouterr().err


def test_trials_in_flight_per_cell():
    assert default_parallel(LauncherConfig(name="inline"), 3) == 1
    assert default_parallel(LauncherConfig(name="slurm"), 3) == 4
    assert default_parallel(LauncherConfig(name="local", workers=8), 3) == 3
    assert default_parallel(LauncherConfig(name="local", workers=2), 3) == 1


def test_a_second_tune_of_the_group_is_refused(sweep, store):
    from mmbalance.bench.tune import tuning_dir, tuning_lock

    with tuning_lock(tuning_dir(store, "t")):
        _, configs = load_sweep(sweep)
        with pytest.raises(ConfigError, match="another `mmbalance tune` is tuning this group"):
            tune(configs, store, options(1), INLINE)


def test_no_completed_trial_is_one_line(sweep, store):
    from mmbalance.bench.tune import Study

    _, configs = load_sweep(sweep)
    [cell] = cells_of([c for c in configs if c.label == "joint"])
    s = open_study(cell, store, options(1))
    with pytest.raises(RunFailed, match="none of its 0 trials completed; nothing to choose"):
        study_record(Study(cell, s.study, s.path, s.trials, s.options))


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
    with pytest.raises(ConfigError, match="lr_range"):
        tune_options(None, {"trials": 2, "lr_range": (0.1, 0.01)})


# Methods that declare no search range (only the optimiser's lr is tuned for them), each with its reason
UNTUNED = {
    "joint": "the baseline: nothing but the optimiser",
    "unimodal": "the baseline: nothing but the optimiser",
    "ume": "unimodal ensemble: trains the unimodal baselines, no coefficient of its own",
    "mbsd": "its only parameters are the window's epochs; the loss terms have no weight in the release",
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
    variants = [{"variant": v} for v in get_args(variant.annotation)] if variant else [{}]
    # and every value a range's `when` names (the configs in which a conditional range is searched)
    conditions = [{key: v} for r in space.values() for key, allowed in r.when.items() for v in allowed]
    searched: set[str] = set()
    for given in ({**v, **c} for v in variants for c in [{}, *conditions]):
        base = {**REQUIRED.get(name, {}), **given}
        try:
            defaults = params.model_validate(base)
        except ValidationError:  # a combination the method refuses (a strategy one variant lacks)
            continue
        applied = search_space(params, defaults.model_dump())
        searched |= set(applied)
        ends = [at_ends(applied, "low"), at_ends(applied, "high")]
        for field, r in applied.items():
            value = getattr(defaults, field)
            assert value is None or r.low <= value <= r.high, (given, field, value, r)
            for end in ends:
                assert getattr(params.model_validate({**base, field: end[field]}), field) == end[field]
        for end in ends:
            params.model_validate({**base, **end})
    assert searched == set(space), f"ranges searched in no config: {set(space) - searched}"


def test_a_conditional_range_is_searched_only_where_its_field_says():
    valuation, lfm = METHODS.get("valuation").Params, METHODS.get("lfm").Params
    assert set(search_space(valuation, valuation().model_dump())) == set()
    assert set(search_space(valuation, valuation(strategy="modality").model_dump())) == {"part_ratio", "alpha"}
    assert set(search_space(lfm, lfm().model_dump())) == set()  # the fitted schedule reads neither
    assert set(search_space(lfm, lfm(schedule="fixed").model_dump())) == {"align_weight"}
    assert set(search_space(lfm, lfm(schedule="learned").model_dump())) == {"align_weight", "lr_alpha"}
    assert search_space(lfm)["lr_alpha"].when == {"schedule": ["learned"]}

    class P(Strict):
        k: float = tunable(1.0, 0.5, 2.0, when={"mode": "a"})

    with pytest.raises(ValueError, match=r"`when` names \['mode'\], not fields of it"):
        search_space(P)


@pytest.mark.slow  # ~30 s each: every trial is a local worker process that imports torch
@pytest.mark.parametrize("schedule", ["rounds", "asap"])
def test_ctrl_c_during_a_local_tune_loses_no_trial_and_the_rerun_resumes(schedule, tmp_path, capsys):
    """The issue's demonstration, small: `mmbalance tune` with the local launcher is stopped by a
    Ctrl-C while its second trial trains; the rerun keeps the first trial as it was, resumes the
    second from its checkpoint and spends exactly the budget. Under `asap` the second trial
    joined the first one's launch, and the Ctrl-C stops that launch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mmbalance.bench.cli import main as cli

    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("epochs: 2", "epochs: 12").replace("seeds: [0, 1]", "seeds: [0]")
                    .replace("  ogm-ge: {method.name: ogm_ge}\n", "")
                    + "launcher: {name: local, workers: 1}\n"
                    + f"tune: {{trials: 3, warmup_epochs: 20, schedule: {schedule}}}\n")
    root = tmp_path / "results"
    trials = root / "t" / "tuning" / "joint"
    tuner = subprocess.Popen([sys.executable, "-m", "mmbalance", "--results", str(root), "tune", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=as_at_a_terminal)

    def second_trial_training() -> bool:
        runs = run_dirs(trials) if trials.is_dir() else []
        states = sorted(rd.recorded_status()["state"] for rd in runs)
        return states == ["finished", "running"] and all(rd.checkpoint.exists() for rd in runs)

    deadline = time.monotonic() + 120
    while not second_trial_training():
        assert tuner.poll() is None and time.monotonic() < deadline, tuner.communicate()
        time.sleep(0.05)
    os.killpg(tuner.pid, signal.SIGINT)
    out, err = tuner.communicate(timeout=60)
    assert tuner.returncode == 130 and "Traceback" not in out + err, err
    [cell] = cells_of(load_sweep(path)[1])
    before = studies(Store(root), [cell])["joint"]
    assert [s for s, _, _ in before] == ["COMPLETE", "RUNNING"]
    [cut] = [rd for rd in run_dirs(trials) if rd.status()["state"] == "interrupted"]
    assert cut.checkpoint.exists()

    assert cli(["--results", str(root), "tune", str(path)]) == 0
    rec = json.loads((root / "t" / "tuning" / "joint.json").read_text())
    assert [t["number"] for t in rec["trials"]] == [0, 1, 2]
    assert (rec["trials"][0]["state"], rec["trials"][0]["value"], rec["trials"][0]["params"]) == before[0]
    assert rec["trials"][1]["params"] == before[1][2] and rec["trials"][1]["run_id"] == cut.run_id
    assert [r["epoch"] for r in cut.read_metrics()] == list(range(12))  # resumed: no epoch twice
    assert len(run_dirs(trials)) == 3
    assert "joint: trial" in capsys.readouterr().out


def test_asap_is_refused_on_slurm_with_one_line(sweep, tmp_path, capsys):
    from mmbalance.bench.cli import main as cli

    code = cli(["--results", str(tmp_path / "results"), "tune", str(sweep), "--trials", "2", "--schedule", "asap",
                "--launcher", "slurm", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: tune.schedule: 'asap' needs the inline or local launcher; on slurm each "
                                 "round of trials is one job array (schedule: rounds)")
    with pytest.raises(ConfigError, match="'asap' needs the inline or local launcher"):
        tune(load_sweep(sweep)[1], Store(tmp_path / "r"), options(2, schedule="asap"), LauncherConfig(name="slurm"))


@pytest.mark.slow  # ~40 s: a dozen local worker processes
def test_asap_on_the_local_launcher_starts_a_trial_and_its_teachers_as_the_last_one_ends(tmp_path, store):
    """UMT on the local launcher, one trial in flight: each next trial joins the running launch
    together with its unimodal teachers, which it waits for; the budget is spent exactly and the
    study is told every trial."""
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.replace("epochs: 2", "epochs: 1").replace("seeds: [0, 1]", "seeds: [0]")
                    .replace("  joint: {method.name: joint}\n", "")
                    .replace("ogm-ge: {method.name: ogm_ge}", "umt: {method.name: umt}"))
    _, configs = load_sweep(path)
    tuned = tune(configs, store, options(3, schedule="asap", parallel=1), LauncherConfig(name="local", workers=2))
    assert tuned.code == 0
    assert [t["state"] for t in tuned.records["umt"]["trials"]] == ["COMPLETE"] * 3
    runs = run_dirs(store.root / "t" / "tuning" / "umt")
    assert len(runs) == 9 and all(rd.done() for rd in runs)  # 3 trials, 2 teachers each
    for rd in runs:  # each trial started once its teachers had finished
        if rd.read_config()["method"]["name"] == "umt":
            teachers = [store.root / "t" / "tuning" / "umt" / rid for rid in needs_of(rd)]
            assert teachers and all(t.joinpath("summary.json").stat().st_mtime <= rd.metrics.stat().st_mtime
                                    for t in teachers)


def needs_of(rd) -> list[str]:
    from mmbalance.bench.config import validate
    from mmbalance.bench.requirements import needs

    return list(needs(validate(rd.read_config())).values())
