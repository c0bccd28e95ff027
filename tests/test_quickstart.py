"""End to end through the CLI: the quickstart sweep, its table (printed = table.csv), `status`, and
the imbalance it shows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

import mmbalance.bench.cli
from mmbalance.bench.cli import main
from mmbalance.bench.resources import quickstart_config
from mmbalance.bench.store import Store
from mmbalance.methods.base import FAMILIES
from tests.test_report import parse_printed

# the staged methods split the budget into stages, so a short version needs short stages: 3 epochs,
# the fewest in which the three-modality block's MIE gives each modality a stage
MINI_EPOCHS = 3
STAGED = {
    "mie": {"method.epoch_list": [2, 1]},
    "mie-3m": {"method.epoch_list": [1, 1, 1]},
    **{cell: {"method.stage1_epochs": 2, "method.stage2_epochs": 1, "method.duc_start_epoch": 0}
       for cell in ("di-mml", "di-mml-3m")},
    **{cell: {"method.modulation_starts": 0} for cell in ("opm", "opm-3m")},  # the release starts at epoch 6
    **{cell: {"method.warmup": 1} for cell in ("remix", "remix-3m")},  # a remixed epoch after the warm-up
}
# the release re-initialises as the next epoch starts, which 3 epochs reach only once; BalanceBenchmark's
# timing does it as epoch 1 ends
MINI_STAGES = {**STAGED, **{cell: {"method.variant": "balancebenchmark", "method.reinit_epoch": 1,
                                   "method.reinit_num": 1} for cell in ("relearning", "relearning-3m")}}


# the cells of the two-modality block that the three-modality block leaves out (configs/quickstart.yaml)
TWO_MODALITIES_ONLY = {"joint-film", "joint-gated", "greedy"}


def short_quickstart(*overrides: str) -> list[str]:
    """The command-line overrides of a 3-epoch quickstart (the stage lengths of its staged cells)."""
    stages = [f"cells.{cell}.{key}={json.dumps(value)}"
              for cell, keys in MINI_STAGES.items() for key, value in keys.items()]
    return [f"train.epochs={MINI_EPOCHS}", *overrides, *stages]


def mini_quickstart(path):
    sweep = yaml.safe_load(quickstart_config().read_text())
    sweep["base"]["train"]["epochs"] = MINI_EPOCHS
    sweep["seeds"] = [0]  # every cell once: the three seeds are the full quickstart's (marker quickstart)
    for cell, overrides in MINI_STAGES.items():
        sweep["cells"][cell].update(overrides)
    for cell in sweep["cells"].values():
        cell.pop("train.epochs", None)  # the three-modality block's own budget
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return sweep["cells"]


def test_mini_quickstart_end_to_end(tmp_path, capsys):
    results, report, sweep_file = tmp_path / "results", tmp_path / "report", tmp_path / "mini.yaml"
    cells = mini_quickstart(sweep_file)
    # in two worker processes, as the quickstart itself trains (bench.parallel): half the wall time on 2 cores
    assert main(["--results", str(results), "run", str(sweep_file), "--report", str(report), "--workers", "2"]) == 0
    n_runs = len(cells)
    # the three-modality block's cells carry their two-modality cell's label: one row label per method
    labels = list(dict.fromkeys(cell.get("label", name) for name, cell in cells.items()))
    assert f"{n_runs} cells x 1 seeds = {n_runs} runs, {len(labels)} row labels" in capsys.readouterr().err
    table = pd.read_csv(report / "table.csv")
    two, three = "avdigits (preset=audio-dominant)", "avdigits (preset=three-modality)"
    assert list(table["dataset"].drop_duplicates()) == [two, three]
    blocks = {ds: list(g["label"]) for ds, g in table.groupby("dataset", sort=False)}
    two_cells = [name for name, cell in cells.items() if "dataset.preset" not in cell]
    assert blocks[two] == two_cells  # the quickstart lists its cells by family, as the table groups them
    # the same methods in the same order, less those defined for two modalities only, plus text's reference
    assert blocks[three] == [label for label in two_cells if label not in TWO_MODALITIES_ONLY] + ["unimodal-text"]
    for ds in (two, three):
        families = table[table["dataset"] == ds].set_index("label")["family"]
        assert families["joint-late"] == "baseline" and families["mla"] == "feed-forward"
        assert families["ogm-ge"] == "optimisation" and families["unimodal-visual"] == "reference"
        assert list(dict.fromkeys(families)) == [f for f in FAMILIES if f in set(families)]  # each family one block
    assert {"joint-concat", "ogm-ge", "mla", "mie", "di-mml", "unimodal-audio", "unimodal-visual"} <= set(cells)
    assert (table["n"] == 1).all()
    assert {"fused acc", "probe audio", "probe visual", "probe text", "deficit visual (uni − probe)",
            "deficit text (uni − probe)", "own audio", "own text"} <= set(table.columns)
    # the two-modality block has no text column values; the three-modality block has them all
    rows = table.set_index(["dataset", "label"])
    assert (rows.loc[two, "probe text"] == "–").all()
    assert (rows.loc[three, "probe text"] != "–").sum() == len(blocks[three]) - 2  # all but audio/visual-only
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == n_runs and runs["acc"].between(0, 1).all()
    assert (report / "table.md").read_text().startswith("## Results")

    # every run is finished and recorded in the store
    states = [rd.status()["state"] for rd in Store(results).runs("quickstart")]
    assert states == ["finished"] * n_runs
    assert main(["status", str(results / "quickstart")]) == 0
    status = capsys.readouterr().out
    assert f"{n_runs} finished" in status and f"{MINI_EPOCHS}/{MINI_EPOCHS}" in status

    # a second invocation skips every finished run and prints the same table
    assert main(["--results", str(results), "run", str(sweep_file), "--report", str(report)]) == 0
    assert pd.read_csv(report / "table.csv").equals(table)


def test_a_shorter_quickstart_from_the_command_line(capsys):
    """Three epochs, one seed: `seeds=[0]`, and the staged cells' stage lengths as
    `cells.<cell>.<key>=...` (a three-modality cell is addressed by its own name, `mie-3m`, while
    its rows carry its label, `mie`); without those, the first cell that cannot run in 2 epochs
    (Remix, whose 30 warm-up epochs leave no remixed one) names its key."""
    cells = yaml.safe_load(quickstart_config().read_text())["cells"]
    assert main(["run", "--dry-run", "quickstart", *short_quickstart("seeds=[0]")]) == 0
    runs = [yaml.safe_load(doc.split("# run id:")[0]) for doc in capsys.readouterr().out.split("---")[:-1]]
    assert [(r["label"], r["train"]["seed"], r["train"]["epochs"]) for r in runs] == [
        (cell.get("label", name), 0, MINI_EPOCHS) for name, cell in cells.items()]
    mie = [r["method"]["epoch_list"] for r in runs if r["method"]["name"] == "mie"]
    assert mie == [[2, 1], [1, 1, 1]]
    assert main(["run", "--dry-run", "quickstart", "train.epochs=2", "seeds=[0]"]) == 2
    assert "run 'remix' seed 0: method.warmup=30 leaves no remixed epoch in train.epochs=2" in capsys.readouterr().err


def test_quickstart_prints_table_csv(tmp_path, monkeypatch, capsys):
    """`mmbalance quickstart` (here on a tiny Gaussian sweep) prints the very strings it writes to
    table.csv, once; the unimodal-only rows have a deficit of exactly 0."""
    sweep = {"group": "quickstart", "seeds": [0, 1],
             "base": {"dataset": {"name": "gaussian"}, "train": {"epochs": 2, "batch_size": 32, "progress": False},
                      "eval": {"probe_c_grid": [0.1, 1.0]}},
             "cells": {"joint": {"method.name": "joint"}, "ogm-ge": {"method.name": "ogm_ge"},
                       "unimodal-audio": {"method.name": "unimodal", "method.modality": "audio"},
                       "unimodal-visual": {"method.name": "unimodal", "method.modality": "visual"}}}
    (tmp_path / "qs.yaml").write_text(yaml.safe_dump(sweep))
    monkeypatch.setattr(mmbalance.bench.cli, "quickstart_config", lambda: tmp_path / "qs.yaml")
    report = tmp_path / "report"
    assert main(["--results", str(tmp_path / "results"), "quickstart", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.count("| label") == 1 and "deficit <m> = probe accuracy on m of the unimodal-only model" in out
    shown = parse_printed(out)
    csv = pd.read_csv(report / "table.csv", dtype=str, keep_default_na=False)
    assert list(shown["label"]) == list(sweep["cells"]) and set(shown.columns) < set(csv.columns)
    pd.testing.assert_frame_equal(shown, csv[shown.columns])
    rows = shown.set_index("label")
    assert rows.loc["unimodal-visual", "deficit visual (uni − probe)"] == "0.000 ± 0.000"
    assert rows.loc["unimodal-audio", "deficit audio (uni − probe)"] == "0.000 ± 0.000"


@pytest.mark.quickstart
def test_full_quickstart_shows_the_imbalance_and_the_methods_against_it(tmp_path):
    """The claims the suite exists for, on the shipped data with the shipped config (3-4 min on 2
    cores, hence a CI step of its own: `make test-quickstart`): in joint training the visual
    encoder learns less than a visual-only model, and every imbalance method raises the visual
    probe and the fused accuracy above joint training's (concat, the field's baseline)."""
    report = tmp_path / "report"
    assert main(["--results", str(tmp_path / "results"), "quickstart", "--report", str(report)]) == 0
    # the report folder: tables, statistics, figures and the pages
    for name in ("README.md", "report.html", "table.md", "table.csv", "table.tex", "stats.md"):
        assert (report / name).stat().st_size > 0, name
    # robustness and modality contribution: eval.robustness and eval.contribution in its base
    assert (report / "robustness.md").stat().st_size > 0
    assert "## Modality contribution" in (report / "README.md").read_text()
    per_dataset = [f"{figure}_avdigits_preset_{preset}"
                   for figure in ("trajectories_modality", "diagnostics", "robustness", "contribution")
                   for preset in ("audio-dominant", "three-modality")]
    for figure in ("fused_accuracy", "probe_vs_unimodal", "accuracy_vs_cost", *per_dataset):
        for suffix in (".png", ".pdf"):
            assert (report / "figures" / f"{figure}{suffix}").stat().st_size > 1000, figure + suffix
    all_runs = pd.read_csv(report / "runs.csv")
    runs = all_runs[all_runs["dataset"] == "avdigits (preset=audio-dominant)"]
    mean = runs.groupby("label")[["acc", "probe.visual", "probe.audio"]].mean()
    visual_only, audio_only = mean.loc["unimodal-visual", "acc"], mean.loc["unimodal-audio", "acc"]
    joint = mean.loc["joint-concat"]
    assert audio_only > visual_only + 0.1  # the preset makes audio the dominant modality
    assert joint["probe.visual"] < visual_only - 0.05
    assert joint["acc"] > visual_only
    methods = [label for label in mean.index if not label.startswith(("joint", "unimodal"))]
    assert len(methods) >= 22
    for method in methods:
        assert mean.loc[method, "probe.visual"] > joint["probe.visual"] + 0.03, method
        assert mean.loc[method, "acc"] > joint["acc"], method
    # OGM-GE's published signature: it trades dominant-modality probe accuracy for the weak one's
    assert mean.loc["ogm-ge", "probe.audio"] < joint["probe.audio"]

    # the three-modality block: audio dominates, and in joint training the weakest modality's
    # encoder learns less than it does alone (a clear positive deficit)
    three = all_runs[all_runs["dataset"] == "avdigits (preset=three-modality)"]
    mean3 = three.groupby("label")[["acc", "probe.audio", "probe.visual", "probe.text"]].mean()
    alone = {m: mean3.loc[f"unimodal-{m}", "acc"] for m in ("audio", "visual", "text")}
    weakest = min(alone, key=alone.get)
    assert alone["audio"] > max(alone["visual"], alone["text"]) + 0.1
    assert mean3.loc["joint-concat", f"probe.{weakest}"] < mean3.loc[f"unimodal-{weakest}", f"probe.{weakest}"] - 0.05
    assert set(three["label"]) == {cell.get("label", name) for name, cell in
                                   yaml.safe_load(quickstart_config().read_text())["cells"].items()
                                   if cell.get("dataset.preset") == "three-modality"}
