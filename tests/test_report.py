"""The report on a synthetic results store with known values: aggregation, statistics (checked
against scipy directly), missing/failed runs shown, probe deficits paired by seed, dataset
identity by full config, LaTeX marks and escaping, paper vs ours, and the CLI (its printed table
is table.csv)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mmbalance.bench.cli import main
from mmbalance.bench.report.build import build_report, table_text
from mmbalance.bench.report.cells import aggregate, display, to_latex
from mmbalance.bench.report.collect import add_deficits, dataset_labels, load_runs
from mmbalance.bench.report.stats import TIE_THRESHOLD, ci_bounds, describe, holm, paired_tests
from mmbalance.bench.store import Store

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
FAMILY = {"joint": "baseline", "ogm_ge": "optimisation", "mla": "feed-forward", "unimodal": "reference"}


def probe(label: str, seed: int) -> dict[str, float]:
    """Probe accuracies: the visual probe of joint is well below the visual-only model's (0.45 +
    0.02 seed), whose probe differs from its head accuracy (ACC) so that the two cannot be confused."""
    if label.startswith("unimodal"):
        return {label.split("-")[1]: 0.45 + 0.02 * seed}
    visual = {"joint": 0.30, "ogm-ge": 0.36, "mla": 0.38}[label]
    return {"audio": 0.55 + 0.01 * seed, "visual": visual + 0.01 * seed}


def summary(label: str, seed: int, acc: float) -> dict:
    block = lambda a, e: {"epoch": e, "test": {"acc": a, "macro_f1": a - 0.02, "map": a + 0.1,  # noqa: E731
                                              "modality_acc": {"audio": a - 0.1, "visual": a - 0.15}}}
    return {"epochs": 10, "method_family": FAMILY[METHOD[label]],
            "best_val": block(acc, 7), "best_test": block(acc + 0.01, 8), "last": block(acc - 0.01, 9),
            "probes": {m: {"test_acc": v} for m, v in probe(label, seed).items()},
            "cost": {"device": "cpu", "seconds_per_epoch": 3.6 * (2 if label == "mla" else 1),
                     "forward_passes_per_step": 1.0, "backward_passes_per_step": 1.0, "peak_rss_mb": 500.0}}


def write_run(store: Store, label: str, seed: int, state: str, acc: float | None, group: str = "g",
              dataset: dict | None = None) -> None:
    rd = store.run_dir(group, f"{label}-s{seed}")
    method = {"name": METHOD[label]}
    if label.startswith("unimodal"):
        method["modality"] = label.split("-")[1]
    rd.write_config({"group": group, "label": label, "dataset": dataset or {"name": "cremad"},
                     "model": {"fusion": "concat"}, "method": method, "train": {"seed": seed, "epochs": 10}})
    rd.set_status(state)
    if state == "finished":
        rd.write_summary(summary(label, seed, acc))
        rd.write_metrics([{"epoch": e, "val": {"acc": acc}, "test": {"acc": acc}} for e in range(10)])


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
    assert ci_bounds(x) == pytest.approx((lo, hi))  # the figures' errorbar: the same interval
    assert (describe([0.0, 0.0])["ci_low"], describe([0.0, 0.0])["ci_high"]) == (0.0, 0.0)  # no spread, no width


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
    # probe deficit = the unimodal-only model's probe − this probe, seed by seed: joint's visual
    # one is (0.45 + 0.02 s) − (0.30 + 0.01 s) = 0.15 + 0.01 s for s = 0..3
    deficits = [0.15, 0.16, 0.17, 0.18]
    assert agg.loc["joint", "deficit.visual:mean"] == pytest.approx(np.mean(deficits))
    assert agg.loc["joint", "deficit.visual:std"] == pytest.approx(np.std(deficits, ddof=1))
    assert agg.loc["mla", "deficit.audio:mean"] == pytest.approx(
        np.mean([0.45 + 0.02 * s - 0.55 - 0.01 * s for s in range(3)]))
    # ... and exactly 0 for the unimodal-only model against itself (its head acc is not its probe)
    assert (runs.loc[runs["label"] == "unimodal-visual", "deficit.visual"] == 0).all()
    assert agg.loc["unimodal-visual", "deficit.visual:mean"] == 0
    assert agg.loc["unimodal-visual", "deficit.visual:std"] == 0
    shown = display(aggregate(runs)).set_index("label")
    assert shown.loc["unimodal-visual", "deficit visual (uni − probe)"] == "0.000 ± 0.000"
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
    mla = next(line for line in tex.splitlines() if line.startswith("cremad & feed-forward & mla"))
    ogm = next(line for line in tex.splitlines() if line.startswith("cremad & optimisation & ogm-ge"))
    assert mla.split(" & ")[4] == r"\textbf{0.713 $\pm$ 0.015}"  # highest fused acc
    assert ogm.split(" & ")[4].startswith(r"\underline{0.667")  # second
    assert r"\toprule" in tex and r"\bottomrule" in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex installed")
def test_latex_compiles(store, tmp_path):
    tex = to_latex(special_agg(store), "caption")
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


def test_a_seed_without_unimodal_reference_has_no_deficit_and_says_so():
    runs = pd.DataFrame({"dataset": "d", "label": ["joint"] * 3 + ["unimodal-visual"] * 2, "state": "finished",
                         "method": ["joint"] * 3 + ["unimodal"] * 2, "seed": [0, 1, 2, 0, 1],
                         "unimodal_modality": [None] * 3 + ["visual"] * 2, "run_id": list("abcde"),
                         "probe.visual": [0.3, 0.4, 0.5, 0.6, 0.6]})
    runs = add_deficits(runs)
    assert runs["deficit.visual"].tolist()[:3] == pytest.approx([0.3, 0.2, np.nan], nan_ok=True)
    table = display(aggregate(runs)).set_index("label")
    assert table.loc["joint", "deficit visual (uni − probe)"] == f"0.250 ± {np.std([0.3, 0.2], ddof=1):.3f} (n=2)"
    assert table.loc["unimodal-visual", "deficit visual (uni − probe)"] == "0.000 ± 0.000"


def test_dataset_labels_are_readable_and_unique_per_config():
    configs = [json.dumps(c, sort_keys=True) for c in (
        {"name": "avdigits", "preset": "audio-dominant", "noise_seed": 0},
        {"name": "avdigits", "preset": "balanced", "noise_seed": 0},
        {"name": "gaussian", "dim": 8}, {"name": "gaussian", "dim": 16}, {"name": "cremad", "root": "/d/x"})]
    assert list(dataset_labels(configs).values()) == [
        "avdigits (preset=audio-dominant)", "avdigits (preset=balanced)", "gaussian (dim=8)", "gaussian (dim=16)",
        "cremad (root=/d/x)"]


@pytest.fixture(scope="module")
def two_presets(tmp_path_factory) -> Store:
    """One dataset, two presets: in preset b joint's accuracy is 0.2 lower, mla's 0.1 lower and the
    visual-only probe 0.1 higher than in preset a, so pairing with the other preset's baseline
    or reference would show."""
    store = Store(tmp_path_factory.mktemp("presets"))
    for preset, shift in (("a", {}), ("b", {"joint": -0.2, "mla": -0.1, "unimodal-visual": -0.2})):
        for label in ("joint", "mla", "unimodal-visual"):
            for seed, acc in zip(SEEDS[:3], ACC[label]):
                write_run(store, label, seed, "finished", acc + shift.get(label, 0.0), group=f"g{preset}",
                          dataset={"name": "avdigits", "preset": preset})
                if preset == "b" and label == "unimodal-visual":
                    rd = store.run_dir(f"g{preset}", f"{label}-s{seed}")
                    s = rd.read_summary()
                    s["probes"]["visual"]["test_acc"] += 0.1
                    rd.write_summary(s)
    return store


def test_two_presets_of_one_dataset_are_two_blocks_with_their_own_baselines(two_presets):
    runs, _ = load_runs(two_presets.root)
    a, b = "avdigits (preset=a)", "avdigits (preset=b)"
    agg = aggregate(runs).set_index(["dataset", "label"])
    assert list(agg.index) == [(d, name) for d in (a, b) for name in ("joint", "mla", "unimodal-visual")]
    assert agg.loc[(a, "mla"), "acc:mean"] == pytest.approx(np.mean(ACC["mla"]))
    assert agg.loc[(b, "mla"), "acc:mean"] == pytest.approx(np.mean(ACC["mla"]) - 0.1)
    # each preset's deficit against its own visual-only model: (0.45 + 0.02 s [+ 0.1]) − (0.38 + 0.01 s)
    assert agg.loc[(a, "mla"), "deficit.visual:mean"] == pytest.approx(0.07 + 0.01)
    assert agg.loc[(b, "mla"), "deficit.visual:mean"] == pytest.approx(0.17 + 0.01)
    assert agg.loc[(b, "unimodal-visual"), "deficit.visual:mean"] == 0
    # paired tests: each preset's mla against that preset's joint
    tests = paired_tests(runs[runs["state"] == "finished"]).set_index(["dataset", "label"])
    diff = np.mean(np.subtract(ACC["mla"], ACC["joint"][:3]))
    for d, gain in ((a, 0.0), (b, 0.1)):
        assert tests.loc[(d, "mla"), "baseline"] == "joint" and tests.loc[(d, "mla"), "n_pairs"] == 3
        assert tests.loc[(d, "mla"), "mean_diff"] == pytest.approx(diff + gain)


def parse_printed(text: str) -> pd.DataFrame:
    """The per-dataset markdown blocks the CLI prints, back as one frame with a dataset column."""
    frames, dataset, lines = [], None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| family"):
            dataset = lines[i - 1].removeprefix("dataset: ")
            block = [line for line in lines[i:] if line.startswith("|")]
            block = block[:next((k for k, line in enumerate(block[2:], 2) if line.startswith("| family")), len(block))]
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in block if not line.startswith("|:")]
            frames.append(pd.DataFrame(rows[1:], columns=rows[0]).assign(dataset=dataset))
    return pd.concat(frames, ignore_index=True)


def test_printed_table_is_table_csv(two_presets, tmp_path, capsys):
    assert main(["report", str(two_presets.root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert table_text(two_presets.root) in out  # what `run`/`sweep` print without --report
    shown = parse_printed(out)
    csv = pd.read_csv(tmp_path / "table.csv", dtype=str, keep_default_na=False)
    assert len(shown) == 6 and set(shown.columns) < set(csv.columns)
    assert {"fused acc", "probe visual", "deficit visual (uni − probe)"} <= set(shown.columns)
    pd.testing.assert_frame_equal(shown, csv[shown.columns])


SPECIAL = "a&b%c$d#e_f{g}h~i^j\\k"
SPECIAL_TEX = r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde i\textasciicircum j\textbackslash k"


def special_agg(store: Store) -> pd.DataFrame:
    runs = load_runs(store.root / "g")[0]
    return aggregate(runs.assign(label=runs["label"].replace({"mla": SPECIAL})))


def test_latex_escapes_every_special_character(store):
    tex = to_latex(special_agg(store), "caption")
    row = next(line for line in tex.splitlines() if line.startswith("cremad & feed-forward & a"))
    assert row.split(" & ")[2] == SPECIAL_TEX
    assert r"deficit visual (uni $-$ probe)" in tex and "±" not in tex and "–" not in tex
