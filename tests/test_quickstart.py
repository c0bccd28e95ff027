"""End to end through the CLI: the quickstart sweep, its table, `status`, and the imbalance it shows."""

from __future__ import annotations

import pandas as pd
import yaml

from bench.cli import QUICKSTART, main
from bench.store import Store

# the staged methods split the budget into stages, so a 2-epoch version needs 2-epoch stages
MINI_STAGES = {
    "mie": {"method.epoch_list": [1, 1]},
    "di-mml": {"method.stage1_epochs": 1, "method.stage2_epochs": 1, "method.duc_start_epoch": 0},
}


def mini_quickstart(path):
    sweep = yaml.safe_load(QUICKSTART.read_text())
    sweep["base"]["train"]["epochs"] = 2
    for cell, overrides in MINI_STAGES.items():
        sweep["cells"][cell].update(overrides)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return list(sweep["cells"])


def test_mini_quickstart_end_to_end(tmp_path, capsys):
    results, report, sweep_file = tmp_path / "results", tmp_path / "report", tmp_path / "mini.yaml"
    cells = mini_quickstart(sweep_file)
    assert main(["--results", str(results), "run", str(sweep_file), "--report", str(report)]) == 0
    n_runs = 3 * len(cells)
    assert f"{len(cells)} cells x 3 seeds = {n_runs} runs" in capsys.readouterr().out
    table = pd.read_csv(report / "table.csv")
    assert list(table["cell"]) == cells
    assert {"joint-concat", "ogm-ge", "mla", "mie", "di-mml", "unimodal-audio", "unimodal-visual"} <= set(cells)
    assert (table["seeds"] == 3).all()
    assert {"fused acc", "probe audio", "probe visual", "probe visual Δ vs uni", "own audio"} <= set(table.columns)
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == n_runs and runs["acc"].between(0, 1).all()
    assert (report / "table.md").read_text().startswith("# sweep quickstart")

    # every run is finished and recorded in the store
    states = [rd.status()["state"] for rd in Store(results).runs("quickstart")]
    assert states == ["finished"] * n_runs
    assert main(["status", str(results / "quickstart")]) == 0
    status = capsys.readouterr().out
    assert f"{n_runs} finished" in status and "2/2" in status

    # a second invocation skips every finished run and prints the same table
    assert main(["--results", str(results), "run", str(sweep_file), "--report", str(report)]) == 0
    assert pd.read_csv(report / "table.csv").equals(table)


def test_full_quickstart_shows_the_imbalance_and_the_methods_against_it(tmp_path):
    """The claims the suite exists for, on the shipped data with the shipped config (~2.5 min):
    in joint training the visual encoder learns less than a visual-only model, and every
    imbalance method raises the visual probe above joint training's."""
    report = tmp_path / "report"
    assert main(["--results", str(tmp_path / "results"), "quickstart", "--report", str(report)]) == 0
    # the report folder: tables, statistics, figures and the pages
    for name in ("README.md", "report.html", "table.md", "table.csv", "table.tex", "stats.md"):
        assert (report / name).stat().st_size > 0, name
    for figure in ("fused_accuracy", "probe_vs_unimodal", "trajectories_modality", "diagnostics", "accuracy_vs_cost"):
        for suffix in (".png", ".pdf"):
            assert (report / "figures" / f"{figure}{suffix}").stat().st_size > 1000, figure + suffix
    runs = pd.read_csv(report / "runs.csv")
    mean = runs.groupby("label")[["acc", "probe.visual", "probe.audio"]].mean()
    visual_only, audio_only = mean.loc["unimodal-visual", "acc"], mean.loc["unimodal-audio", "acc"]
    joint = mean.loc["joint-concat"]
    assert audio_only > visual_only + 0.1  # the preset makes audio the dominant modality
    assert joint["probe.visual"] < visual_only - 0.05
    assert joint["acc"] > visual_only
    for method in ("ogm-ge", "mla", "mie", "di-mml"):
        assert mean.loc[method, "probe.visual"] > joint["probe.visual"] + 0.03, method
        assert mean.loc[method, "acc"] > joint["acc"], method
    # OGM-GE's published signature: it trades dominant-modality probe accuracy for the weak one's
    assert mean.loc["ogm-ge", "probe.audio"] < joint["probe.audio"]
