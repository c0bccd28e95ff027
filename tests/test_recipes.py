"""Every paper recipe resolves without data (`mmbalance run --dry-run`), as do sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmbalance.bench.cli import main as cli

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_paper_and_dataset():
    names = {p.stem for p in RECIPES}
    assert {"ogmge_cremad", "ogmge_kinetics_sounds", "ogmge_vggsound", "mla_cremad", "mla_kinetics_sounds",
            "mie_cremad", "mie_kinetics_sounds", "dimml_cremad", "dimml_ave", "dimml_ucf101",
            "dimml_modelnet40"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_without_data(recipe, capsys):
    assert cli(["run", "--dry-run", str(recipe)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("# run id:")[0])
    written = yaml.safe_load(recipe.read_text())
    assert resolved["dataset"]["name"] == written["dataset"]["name"]
    assert resolved["dataset"]["pipeline"] == written["dataset"]["pipeline"]
    assert resolved["train"]["epochs"] == written["train"]["epochs"]
    assert "1 run config(s) valid" in out


def test_dry_run_of_a_sweep_lists_every_run(capsys):
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    sweep = yaml.safe_load(quickstart.read_text())
    assert cli(["run", "--dry-run", str(quickstart)]) == 0
    assert f"{len(sweep['cells']) * len(sweep['seeds'])} run config(s) valid" in capsys.readouterr().out


def test_dry_run_reports_a_bad_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: cremad, pipeline: ogmge, frame_sise: 32}\n")
    assert cli(["run", "--dry-run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "frame_sise" in err and "frame_size" in err
