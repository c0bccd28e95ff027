"""The report on a synthetic results store with known values: aggregation, statistics (checked
against scipy directly), missing/failed runs shown, LaTeX marks, paper vs ours, and the CLI."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench.cli import main
from bench.report.build import build_report
from bench.report.cells import aggregate, to_latex
from bench.report.collect import load_runs
from bench.report.stats import TIE_THRESHOLD, describe, holm, paired_tests
from bench.store import Store

SEEDS = [0, 1, 2, 3]
# fused test accuracy at the best-val epoch per (label, seed); best-test adds 0.01
ACC = {
    "joint": [0.60, 0.62, 0.61, 0.65],
    "ogm-ge": [0.66, 0.65, 0.69, None],  # seed 3 failed
    "mla": [0.70, 0.71, 0.73],  # seed 3 never launched
    "unimodal-audio": [0.58, 0.59, 0.60, 0.57],
    "unimodal-visual": [0.40, 0.42, 0.41, 0.43],
}
METHOD = {"joint": "joint", "ogm-ge": "ogm_ge", "mla": "mla", "unimodal-audio": "unimodal",
          "unimodal-visual": "unimodal"}


def probe(label: str, seed: int) -> dict[str, float]:
    """Probe accuracies: the visual probe of joint is well below the visual-only model (0.415)."""
    visual = {"joint": 0.30, "ogm-ge": 0.36, "mla": 0.38}.get(label, 0.40)
    return {"audio": 0.55 + 0.01 * seed, "visual": visual + 0.01 * seed}


def summary(label: str, seed: int, acc: float) -> dict:
    block = lambda a, e: {"epoch": e, "test": {"acc": a, "macro_f1": a - 0.02, "map": a + 0.1,  # noqa: E731
                                              "modality_acc": {"audio": a - 0.1, "visual": a - 0.3}}}
    return {"epochs": 10, "best_val": block(acc, 7), "best_test": block(acc + 0.01, 8), "last": block(acc - 0.01, 9),
            "probes": {m: {"test_acc": v} for m, v in probe(label, seed).items()},
            "cost": {"device": "cpu", "seconds_per_epoch": 3.6 * (2 if label == "mla" else 1),
                     "forward_passes_per_step": 1.0, "backward_passes_per_step": 1.0, "peak_rss_mb": 500.0}}


def write_run(store: Store, label: str, seed: int, state: str, acc: float | None) -> None:
    rd = store.run_dir("g", f"{label}-s{seed}")
    method = {"name": METHOD[label]}
    if label.startswith("unimodal"):
        method["modality"] = label.split("-")[1]
    rd.write_config({"group": "g", "label": label, "dataset": {"name": "cremad"}, "model": {"fusion": "concat"},
                     "method": method, "train": {"seed": seed}})
    rd.set_status(state)
    if state == "finished":
        rd.write_summary(summary(label, seed, acc))
        rd.write_metrics([{"epoch": e, "val": {"acc": acc}} for e in range(10)])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("results"))
    for label, accs in ACC.items():
        for seed, acc in zip(SEEDS, accs):
            write_run(store, label, seed, "finished" if acc is not None else "failed", acc)
    return store


def test_describe_matches_scipy_t_interval():
    x = [0.60, 0.62, 0.61, 0.65]
    d = describe(x)
    lo, hi = sps.t.interval(0.95, 3, loc=np.mean(x), scale=sps.sem(x))
    assert d["n"] == 4 and d["mean"] == pytest.approx(0.62) and d["std"] == pytest.approx(np.std(x, ddof=1))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi))
    assert np.isnan(describe([0.5])["std"]) and describe([])["n"] == 0


def test_holm_adjusts_in_input_order():
    # sorted p: 0.01 (x3), 0.02 (x2), 0.04 (x1) -> 0.03, 0.04, 0.04 (monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, np.nan, 0.6]) == pytest.approx([1.0, np.nan, 1.0], nan_ok=True)


def test_aggregate_means_stds_and_missing_runs(store):
    runs, metrics = load_runs(store.root / "g")
    assert len(runs) == 19 and set(metrics) == set(runs["run_id"])
    agg = aggregate(runs).set_index("label")
    assert agg.loc["joint", "acc:mean"] == pytest.approx(0.62)
    assert agg.loc["joint", "acc:std"] == pytest.approx(np.std(ACC["joint"], ddof=1))
    assert agg.loc["joint", "map:mean"] == pytest.approx(0.72)
    assert agg.loc["ogm-ge", "n"] == 3 and "ogm-ge-s3 (failed)" in agg.loc["ogm-ge", "not finished"]
    assert agg.loc["mla", "n"] == 3 and agg.loc["mla", "missing seeds"] == "3"
    assert agg.loc["joint", "missing seeds"] == "" and agg.loc["joint", "not finished"] == ""
    # unimodal reference and probe deficit (reference − probe), here of the visual modality
    assert agg.loc["joint", "uni.visual:mean"] == pytest.approx(0.415)
    assert agg.loc["joint", "deficit.visual:mean"] == pytest.approx(0.415 - 0.315)
    assert agg.loc["mla", "cpu_hours:mean"] == pytest.approx(7.2 * 10 / 3600)
    # selection rules read the matching summary block
    assert load_runs(store.root / "g", "test")[0].set_index("run_id").loc["joint-s0", "acc"] == pytest.approx(0.61)
    assert load_runs(store.root, "last")[0].set_index("run_id").loc["joint-s0", "acc"] == pytest.approx(0.59)


def test_paired_tests_match_scipy_on_shared_seeds(store):
    runs, _ = load_runs(store.root / "g")
    tests = paired_tests(runs[runs["state"] == "finished"]).set_index("label")
    assert set(tests.index) == {"ogm-ge", "mla", "unimodal-audio", "unimodal-visual"}
    assert (tests["baseline"] == "joint").all()
    ref = sps.ttest_rel(ACC["mla"], ACC["joint"][:3])  # seeds 0-2 are the shared ones
    assert tests.loc["mla", "n_pairs"] == 3
    assert (tests.loc["mla", "t"], tests.loc["mla", "p"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert tests["p_holm"].tolist() == pytest.approx(holm(tests["p"].tolist()))
    d = np.subtract(ACC["mla"], ACC["joint"][:3])
    assert tests.loc["mla", "p_wilcoxon"] == pytest.approx(sps.wilcoxon(d).pvalue)
    # per-seed W/T/L: ogm-ge − joint = +0.06, +0.03, +0.08; unimodal-audio − joint = −0.02, −0.03, −0.01, −0.08
    assert tuple(tests.loc["ogm-ge", ["wins", "ties", "losses"]]) == (3, 0, 0)
    assert tuple(tests.loc["unimodal-audio", ["wins", "ties", "losses"]]) == (0, 0, 4)
    assert TIE_THRESHOLD == 0.005


def test_latex_marks_best_bold_and_second_underlined(store):
    agg = aggregate(load_runs(store.root / "g")[0])
    tex = to_latex(agg, "caption")
    mla = next(line for line in tex.splitlines() if line.startswith("cremad & mla"))
    ogm = next(line for line in tex.splitlines() if line.startswith("cremad & ogm-ge"))
    assert mla.split(" & ")[3] == r"\textbf{0.713 $\pm$ 0.015}"  # highest fused acc
    assert ogm.split(" & ")[3].startswith(r"\underline{0.667")  # second
    assert r"\toprule" in tex and r"\bottomrule" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex installed")
def test_latex_compiles(store, tmp_path):
    tex = to_latex(aggregate(load_runs(store.root / "g")[0]), "caption")
    doc = tmp_path / "t.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[landscape]{geometry}"
                   f"\\begin{{document}}{tex}\\end{{document}}")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", doc.name], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "t.pdf").stat().st_size > 0


def test_paper_vs_ours_maps_names_and_protocols(store, tmp_path):
    paper = tmp_path / "paper.csv"
    paper.write_text("paper,table,dataset,method,metric,value,selection,source\n"
                     "p,t,cremad,baseline,acc,63.0,best-test-epoch,s\n"
                     "p,t,cremad,ogm,macro_f1,60.0,best-val-epoch,s\n"
                     "p,t,cremad,unimodal-visual,acc,41.0,unknown,s\n"
                     "p,t,ks,baseline,acc,50.0,best-test-epoch,s\n")  # no KS runs: left out
    report = build_report(store.root / "g", tmp_path / "rep", paper_csv=paper)
    table = pd.read_csv(report.out / "paper_vs_ours.csv").set_index("method")
    assert list(table.index) == ["joint", "ogm_ge", "unimodal (visual)"]
    assert table.loc["joint", "Δ (ours − published)"] == pytest.approx(63.0 - 63.0)  # best-test mean 0.63
    assert table.loc["ogm_ge", "Δ (ours − published)"] == pytest.approx(100 * np.mean([0.64, 0.63, 0.67]) - 60)
    assert table.loc["joint", "ours (best-val)"] == f"62.00 ± {100 * np.std(ACC['joint'], ddof=1):.2f}"
    assert np.isnan(table.loc["unimodal (visual)", "Δ (ours − published)"])


def test_cli_writes_the_report_folder(store, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(store.root), "--out", str(out), "--select", "test"]) == 0
    printed = capsys.readouterr().out
    assert "19 runs (18 finished, 1 failed)" in printed and "mla 3/0/0" in printed
    for name in ("table.md", "table.csv", "table.tex", "stats.md", "stats.csv", "paper_vs_ours.md",
                 "runs.csv", "README.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "README.md").read_text()
    assert "ogm-ge-s3 (failed)" in page and "Holm" in page and "Student-t interval" in page
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table" in html and "src='http" not in html
    for png in (out / "figures").glob("*.png") if (out / "figures").exists() else []:
        assert "data:image/png;base64," in html and png.stem in page
    assert main(["report", str(store.root), "--out", str(out), "--by", "method"]) == 2
