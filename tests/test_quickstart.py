"""End to end through the CLI: the quickstart sweep, its table, `status`, and the imbalance it shows."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.cli import main
from bench.store import Store


def test_mini_quickstart_end_to_end(tmp_path, capsys):
    results, report = tmp_path / "results", tmp_path / "report"
    code = main(["--results", str(results), "quickstart", "train.epochs=2", "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert "7 cells x 3 seeds = 21 runs" in out
    table = pd.read_csv(report / "table.csv")
    assert list(table["cell"]) == ["joint-concat", "joint-sum", "joint-film", "joint-gated", "joint-late",
                                   "unimodal-audio", "unimodal-visual"]
    assert (table["seeds"] == 3).all()
    assert {"fused acc", "probe audio", "probe visual", "probe visual Δ vs uni", "own audio"} <= set(table.columns)
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == 21 and runs["acc"].between(0, 1).all()
    assert (report / "table.md").read_text().startswith("# sweep quickstart")

    # every run is finished and recorded in the store
    states = [rd.status()["state"] for rd in Store(results).runs("quickstart")]
    assert states == ["finished"] * 21
    assert main(["status", str(results / "quickstart")]) == 0
    status = capsys.readouterr().out
    assert "21 finished" in status and "2/2" in status

    # a second invocation skips every finished run and prints the same table
    assert main(["--results", str(results), "quickstart", "train.epochs=2", "--report", str(report)]) == 0
    assert pd.read_csv(report / "table.csv").equals(table)


def test_full_quickstart_shows_the_weak_modality_under_trained(tmp_path, capsys):
    """The claim the suite exists for, on the shipped data with the shipped config (about a minute):
    in joint training the visual encoder learns less than a visual-only model."""
    report = tmp_path / "report"
    assert main(["--results", str(tmp_path / "results"), "quickstart", "--report", str(report)]) == 0
    runs = pd.read_csv(report / "runs.csv")
    by_cell = runs.groupby("label")
    visual_only = by_cell.get_group("unimodal-visual")["acc"].mean()
    audio_only = by_cell.get_group("unimodal-audio")["acc"].mean()
    joint = by_cell.get_group("joint-concat")
    assert audio_only > visual_only + 0.1  # the preset makes audio the dominant modality
    assert joint["probe.visual"].mean() < visual_only - 0.02
    assert joint["acc"].mean() > visual_only
