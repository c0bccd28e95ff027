"""Sweep files: expansion into labelled, seeded run configs, and errors that name the cell."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmbalance.bench.sweep import is_sweep_file, load_sweep
from mmbalance.core.errors import ConfigError

SWEEP = """
group: demo
base:
  dataset: {name: gaussian}
  train: {epochs: 2}
seeds: [0, 1]
cells:
  concat: {method.name: joint, model.fusion: concat}
  visual-only: {method.name: unimodal, method.modality: visual}
"""


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_cells_times_seeds_with_labels_and_group(tmp_path):
    path = write(tmp_path, SWEEP)
    assert is_sweep_file(path)
    sweep, configs = load_sweep(path, ["train.epochs=3"])
    assert [(c.label, c.train.seed) for c in configs] == [
        ("concat", 0), ("concat", 1), ("visual-only", 0), ("visual-only", 1)]
    assert {c.group for c in configs} == {"demo"}
    assert {c.train.epochs for c in configs} == {3}  # overrides apply over base and cells
    assert configs[2].method == {"name": "unimodal", "modality": "visual"}
    assert len({c.run_id() for c in configs}) == 4


def test_a_bad_key_in_a_cell_names_the_cell(tmp_path):
    path = write(tmp_path, SWEEP.replace("model.fusion: concat", "model.fusoin: concat"))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "model.fusoin" in msg and "cell 'concat'" in msg and str(path) in msg and "fusion" in msg


def test_a_sweep_needs_cells(tmp_path):
    path = write(tmp_path, "group: demo\ncells: {}\n")
    with pytest.raises(ConfigError, match="cells"):
        load_sweep(path)


def test_a_cell_the_method_rejects_stops_the_sweep_before_any_run(tmp_path):
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import run_inline

    path = write(tmp_path, SWEEP + "  mie-too-long: {method.name: mie, method.epoch_list: [5, 5]}\n")
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    with pytest.raises(ConfigError, match="run 'mie-too-long' seed 0: method.epoch_list.*10.*2"):
        run_inline(configs, store)
    assert not store.root.exists()


def test_seeds_and_a_cells_key_from_the_command_line(tmp_path):
    """`seeds=` and `cells.<cell>.<key>=` change the sweep as the file would; a cell's key is
    changed in include rows that start from the cell too, and other overrides still reach every run."""
    path = write(tmp_path, SWEEP + "  mie: {method.name: mie, method.epoch_list: [1, 1]}\n"
                                   "include:\n  - {cell: mie, label: mie-again, optim.lr: 0.5}\n")
    _, configs = load_sweep(path, ["seeds=[3]", "cells.mie.method.epoch_list=[2, 1]", "train.epochs=3"])
    assert [(c.label, c.train.seed) for c in configs] == [
        ("concat", 3), ("visual-only", 3), ("mie", 3), ("mie-again", 3)]
    assert [c.method.get("epoch_list") for c in configs] == [None, None, [2, 1], [2, 1]]
    assert {c.train.epochs for c in configs} == {3}
    _, plain = load_sweep(path)
    assert [c.method.get("epoch_list") for c in plain if c.train.seed == 0] == [None, None, [1, 1], [1, 1]]


@pytest.mark.parametrize("override, words", [
    ("cells.mie.method.epoch_list=oops",
     ["method.epoch_list: Input should be a valid list", "from override 'cells.mie.method.epoch_list=oops'"]),
    ("cells.mei.method.alpha=1", ["cells.<cell>.<key>=value", "concat, visual-only, mie"]),
    ("cells.mie=1", ["cells.<cell>.<key>=value"]),
    ("seeds=zero", ["seeds: Input should be a valid list", "from override 'seeds=zero'"]),
    ("seeds.first=0", ["seeds=[0,1]"]),
])
def test_sweep_overrides_mistakes_name_the_override(tmp_path, override, words):
    path = write(tmp_path, SWEEP + "  mie: {method.name: mie, method.epoch_list: [1, 1]}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(path, [override])
    for word in words:
        assert word in str(e.value), str(e.value)


# ---------------------------------------------------------------- grid, include, exclude, recipe

GRID = """
group: grid
base:
  dataset: {name: gaussian}
  train: {epochs: 2}
seeds: [0, 1]
cells:
  joint: {method: {name: joint}}
  audio-only: {method: {name: unimodal, modality: audio}}
grid:
  model.fusion: [concat, sum]
  optim.lr: [0.01, 0.1]
exclude:
  - {cell: audio-only, model.fusion: sum}
  - {model.fusion: sum, optim.lr: [0.1]}
include:
  - {cell: joint, model.fusion: gated, label: joint-gated}
  - {method: {name: unimodal, modality: visual}}
"""


def test_grid_crosses_cells_minus_exclude_plus_include(tmp_path):
    sweep, configs = load_sweep(write(tmp_path, GRID))
    labels = list(dict.fromkeys(c.label for c in configs))
    assert labels == [
        "joint/fusion=concat,lr=0.01", "joint/fusion=concat,lr=0.1", "joint/fusion=sum,lr=0.01",
        "audio-only/fusion=concat,lr=0.01", "audio-only/fusion=concat,lr=0.1",
        "joint-gated", "method=unimodal"]
    assert len(configs) == 7 * 2
    by_label = {c.label: c for c in configs if c.train.seed == 1}
    assert by_label["joint/fusion=sum,lr=0.01"].model.fusion == "sum"
    assert by_label["joint/fusion=sum,lr=0.01"].optim.lr == 0.01
    gated = by_label["joint-gated"]
    assert gated.model.fusion == "gated" and gated.method == {"name": "joint", "late_loss": gated.method["late_loss"]}
    assert by_label["method=unimodal"].method == {"name": "unimodal", "modality": "visual"}
    assert sweep.launcher.name == "inline"


def test_run_ids_are_stable_and_equal_to_the_plain_configs(tmp_path):
    from mmbalance.bench.config import load_config

    _, first = load_sweep(write(tmp_path, GRID))
    reordered = GRID.replace("  model.fusion: [concat, sum]\n  optim.lr: [0.01, 0.1]\n",
                             "  optim.lr: [0.01, 0.1]\n  model.fusion: [concat, sum]\n")
    _, second = load_sweep(write(tmp_path, reordered))
    ids = {(c.label, c.train.seed): c.run_id() for c in first}
    assert len(set(ids.values())) == 14
    assert {c.run_id() for c in second} == set(ids.values())  # the grid's key order changes labels, not ids
    plain = load_config(None, ["dataset.name=gaussian", "train.epochs=2", "method.name=joint",
                               "model.fusion=sum", "optim.lr=0.01", "train.seed=1"])
    assert ids[("joint/fusion=sum,lr=0.01", 1)] == plain.run_id()


def test_a_recipe_is_the_base_and_base_merges_over_it(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(
        "dataset: {name: gaussian}\nmethod: {name: ogm_ge, alpha: 0.5}\ntrain: {epochs: 7, batch_size: 16}\n")
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    path = sweeps / "s.yaml"
    path.write_text("group: r\nrecipe: ../recipes/r.yaml\nbase: {train: {epochs: 3}}\n"
                    "cells: {ogm-ge: {}, joint: {method: {name: joint}}}\n")
    _, configs = load_sweep(path)
    assert [(c.label, c.method["name"], c.train.epochs, c.train.batch_size) for c in configs] == [
        ("ogm-ge", "ogm_ge", 3, 16), ("joint", "joint", 3, 16)]
    assert configs[0].method["alpha"] == 0.5


@pytest.mark.parametrize("text, words", [
    (GRID.replace("model.fusion: [concat, sum]", "model.fusoin: [concat, sum]"),
     ["model.fusoin", "grid", "fusion"]),
    (GRID.replace("- {cell: audio-only, model.fusion: sum}", "- {cell: audio-only, model.fusion: sun}"),
     ["exclude[0]", "matches no run"]),
    (GRID.replace("group: grid", "group: grid\ngird: {}"), ["gird", "grid"]),
    (GRID.replace("cell: joint, model.fusion: gated", "cell: jiont, model.fusion: gated"),
     ["include[0]", "jiont"]),
    ("group: g\nrecipe: nowhere.yaml\n", ["nowhere.yaml", "does not exist"]),
    ("group: g\nbase: {dataset: {name: gaussian}}\ngrid: {optim.lr: []}\n", ["optim.lr", "no values"]),
    ("group: g\nbase: {dataset: {name: gaussian}}\ngrid: {optim.lr: [0.1, 0.1]}\n", ["same config", "exclude"]),
    ("group: g\nbase: {dataset: {name: gaussian}}\nlauncher: {name: slrum}\n", ["launcher.name", "slrum"]),
])
def test_sweep_file_mistakes_name_the_key_and_where(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    for word in words:
        assert word in msg, msg
    assert str(path) in msg or "launcher" in msg or "optim.lr" in msg


# ---------------------------------------------------------------- the plan (dry run)


def test_plan_marks_finished_resume_and_new(tmp_path, capsys):
    from mmbalance.bench.cli import main as cli
    from mmbalance.bench.launch.plan import plan
    from mmbalance.bench.store import Store
    from tests.conftest import stand_in_summary

    path = write(tmp_path, SWEEP)
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    done, started, failed = (store.run_dir(c.group, c.run_id()) for c in configs[:3])
    done.write_summary(stand_in_summary())
    done.set_status("finished")
    started.set_status("interrupted")
    started.save(started.checkpoint, {"epoch": 0})
    failed.set_status("failed", error="boom")
    states = [p.state for p in plan(configs, store)]
    assert states == ["finished", "resume", "new", "new"]
    assert cli(["--results", str(store.root), "sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 1 finished, 1 will resume, 2 new" in out
    assert f"concat       seed 1   {configs[1].run_id()}  resume (was interrupted)" in out
    assert not (store.root / "demo" / configs[3].run_id()).exists()  # a dry run writes nothing


PAPER_SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=lambda p: p.stem)
def test_paper_sweeps_plan_without_data(path, tmp_path, capsys):
    from mmbalance.bench.cli import main as cli

    assert cli(["--results", str(tmp_path), "sweep", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    sweep, configs = load_sweep(path)
    assert sweep.seeds == [0, 1, 2] and path.read_text().startswith("#")
    assert f"{len(configs)} runs: {len(configs)} new" in out
    assert len({c.run_id() for c in configs}) == len(configs)
    assert len(configs) % 3 == 0


def test_there_is_a_sweep_per_paper():
    assert {p.stem for p in PAPER_SWEEPS} >= {"ogmge", "mla", "mie", "dimml"}


def test_ogmge_sweep_is_its_table():
    _, configs = load_sweep(next(p for p in PAPER_SWEEPS if p.stem == "ogmge"))
    cremad = {c.label.split("/", 1)[1] for c in configs if c.dataset["name"] == "cremad"}
    assert cremad == {f"{m}/fusion={f}" for m in ("joint", "ogm-ge") for f in ("concat", "sum", "film", "gated")} | {
        "ogm/fusion=concat", "unimodal-audio/fusion=concat", "unimodal-visual/fusion=concat"}
    assert {c.dataset["name"] for c in configs} == {"cremad", "kinetics_sounds", "vggsound"}
    alphas = {c.dataset["name"]: c.method["alpha"] for c in configs if c.method["name"] == "ogm_ge"}
    assert alphas == {"cremad": 0.8, "kinetics_sounds": 0.8, "vggsound": 0.1}


def test_a_cells_label_names_its_rows_on_another_dataset(tmp_path):
    """A cell's `label` key replaces its name in labels (so that blocks on two datasets share row
    labels), while the name stays its handle on the command line; one label twice on one dataset
    is an error, as is a label that is not a string."""
    text = SWEEP + "  concat-2: {label: concat, dataset.dim: 4, method.name: joint, model.fusion: concat}\n"
    _, configs = load_sweep(write(tmp_path, text), ["cells.concat-2.model.fusion=sum", "seeds=[0]"])
    assert [(c.label, c.dataset["dim"], c.model.fusion) for c in configs] == [
        ("concat", 8, "concat"), ("visual-only", 8, "concat"), ("concat", 4, "sum")]
    with pytest.raises(ConfigError, match="cells 'concat' and 'concat-2' both give label 'concat' on dataset"):
        load_sweep(write(tmp_path, text.replace("dataset.dim: 4", "train.batch_size: 16")))
    with pytest.raises(ConfigError, match="a cell's label must be a non-empty string"):
        load_sweep(write(tmp_path, text.replace("label: concat", "label: 3")))
