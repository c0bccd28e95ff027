"""The report's figures: every file is written (PNG and PDF, non-empty, PNGs of a real size) from a
synthetic runs table and from a real (tiny) results store; and what they show is checked, read
back from the matplotlib Axes: one series per method with the aggregate's means and 95%
t-intervals, one colour per method in every figure, accuracy axes inside [0, 1] (with a caption
note when few seeds make the intervals wide), and labels that are there and do not overlap."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.container import BarContainer
from PIL import Image

from mmbalance.bench.report.cells import aggregate, display, label_order
from mmbalance.bench.report.collect import add_deficits, load_runs
from mmbalance.bench.report.figures import diagnostic_keys, draw_figures, label_colors, make_figures
from mmbalance.bench.train import run

STEMS = ["fused_accuracy", "probe_vs_unimodal", "trajectories_modality", "diagnostics", "accuracy_vs_cost"]
DATASET = "gaussian"
CELLS = [("joint-concat", "joint", None), ("ogm-ge", "ogm_ge", None), ("mla", "mla", None),
         ("unimodal-audio", "unimodal", "audio"), ("unimodal-visual", "unimodal", "visual")]
MULTIMODAL = ["joint-concat", "mla", "ogm-ge"]
FAMILY = {"joint": "baseline", "ogm_ge": "optimisation", "mla": "feed-forward", "unimodal": "reference"}


def record(epoch: int, method: str, rng) -> dict:
    """One metrics.jsonl record shaped like bench.train's."""
    train = {"loss": 2.0 - epoch * 0.1, "seconds": 0.1, "samples_per_s": 1000.0}
    own = {}
    if method == "ogm_ge":
        train.update({"ratio.audio": 2.0, "coef.audio": 0.3, "ratio.visual": 0.5, "coef.visual": 1.0, "modulated": 1.0})
    logged = {"fusion_weight.audio": 0.7, "fusion_weight.visual": 0.3, "p_fro": 3.0} if method == "mla" else {}
    if method == "mla":
        logged["restored_from_epoch"] = None
    for m in ("audio", "visual"):
        own[m] = float(rng.uniform(0.1, 0.9))
    split = {"acc": float(rng.uniform(0.3, 0.9)), "macro_f1": 0.5, "map": 0.5, "loss": 1.0, "modality_acc": own}
    return {"epoch": epoch, "lr": 0.01, "train": train, "val": split, "test": split, "method": logged,
            "selectable": True}


def synthetic(n_seeds: int = 3, epochs: int = 4, spread: float = 0.25) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Finished runs as collect.load_runs gives them (accuracies within ±`spread` of 0.65), and their records."""
    rng = np.random.default_rng(0)
    rows, metrics = [], {}
    for label, method, modality in CELLS:
        for seed in range(n_seeds):
            rid = f"{method}-{label}-{seed}"
            row = {"run_id": rid, "label": label, "method": method, "family": FAMILY[method],
                   "dataset": DATASET, "seed": seed,
                   "state": "finished", "unimodal_modality": modality, "acc": rng.uniform(0.65 - spread, 0.65 + spread),
                   "macro_f1": 0.5, "map": 0.5, "acc_best_test": 0.9, "s_per_epoch": rng.uniform(0.05, 0.2)}
            for m in ("audio", "visual"):
                if modality in (None, m):
                    row[f"own.{m}"] = rng.uniform(0.65 - spread, 0.65 + spread)
                    row[f"probe.{m}"] = rng.uniform(0.65 - spread, 0.65 + spread)
            rows.append(row)
            metrics[rid] = [record(e, method, rng) for e in range(epochs)]
    return pd.DataFrame(rows), metrics


def assert_files(paths, out_dir, stems=STEMS):
    names = {p.name for p in paths}
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    for p in paths:
        assert p.parent == out_dir and p.stat().st_size > 1000, p
        if p.suffix == ".pdf":
            assert p.read_bytes().startswith(b"%PDF")
        else:
            width, height = Image.open(p).size
            assert width > 400 and height > 300, (p, width, height)


def rgb(artist_color) -> tuple:
    return tuple(round(v, 4) for v in to_rgb(artist_color))


def point_series(ax) -> dict[tuple, tuple[float, float, float]]:
    """{colour: (mean, ci low, ci high)} of a horizontal point plot: each colour's one-point line is
    its mean; its error line spans the interval."""
    out: dict[tuple, list] = {}
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), float)
        finite = x[np.isfinite(x)]
        if len(finite) == 1 and line.get_marker() not in (None, "None", ""):
            out.setdefault(rgb(line.get_color()), [None, None, None])[0] = float(finite[0])
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), float)
        finite = x[np.isfinite(x)]
        if len(finite) > 2 and rgb(line.get_color()) in out:
            out[rgb(line.get_color())][1:] = [float(finite.min()), float(finite.max())]
    return {c: tuple(v) for c, v in out.items()}


def bar_series(ax) -> dict[tuple, tuple[float, float, float]]:
    """{colour: (bar length, ci low, ci high)} of a horizontal bar plot: the interval is the error
    line drawn through the bar's centre."""
    out = {}
    for bar in (b for c in ax.containers if isinstance(c, BarContainer) for b in c):
        y = bar.get_y() + bar.get_height() / 2
        err = [np.asarray(line.get_xdata(), float) for line in ax.lines
               if np.nanmean(np.asarray(line.get_ydata(), float)) == pytest.approx(y) and len(line.get_xdata()) > 2]
        low, high = (float(np.nanmin(err[0])), float(np.nanmax(err[0]))) if err else (np.nan, np.nan)
        out[rgb(bar.get_facecolor())] = (bar.get_width(), low, high)
    return out


def assert_readable(fig) -> None:
    """Every drawn panel has a title and axis labels (a y label shared along a facet row counts);
    no two tick labels of an axis overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        if not ax.axison:
            continue
        assert ax.get_title(), ax
        assert ax.get_xlabel(), ax.get_title()
        shared = [o for o in fig.axes if ax.get_shared_y_axes().joined(ax, o)]  # a facet row labels y once
        assert any(o.get_ylabel() or any(t.get_text() for t in o.get_yticklabels())
                   for o in [ax, *shared]), ax.get_title()
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [t.get_window_extent(renderer) for t in ticks if t.get_visible() and t.get_text()]
            for a, b in itertools.combinations(boxes, 2):
                assert not a.overlaps(b), (ax.get_title(), [t.get_text() for t in ticks])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def drawn():
    runs, metrics = synthetic()
    agg = aggregate(runs)
    return agg, runs, metrics, draw_figures(agg, runs, metrics)


def test_one_colour_per_label_in_one_order():
    runs, _ = synthetic(n_seeds=1)
    order = label_order(runs.iloc[::-1])  # the order does not depend on the rows' order
    assert order == ["joint-concat", "mla", "ogm-ge", "unimodal-audio", "unimodal-visual"]
    # grouped by family (joint, feed-forward, optimisation, unimodal), whatever a sweep's order
    assert label_order(runs, ["ogm-ge", "absent", "mla"]) == order
    # within a family a sweep's order comes first; a label whose runs recorded no family comes
    # after the four families, before the unimodal references
    extra = runs[runs["label"] == "mla"].assign(label="agm", method="agm", family="optimisation")
    unrecorded = runs[runs["label"] == "mla"].assign(label="old", method="old", family=None)
    more = pd.concat([runs, extra, unrecorded])
    assert label_order(more, ["ogm-ge", "agm"]) == ["joint-concat", "mla", "ogm-ge", "agm", "old",
                                                    "unimodal-audio", "unimodal-visual"]
    assert label_order(more) == ["joint-concat", "mla", "agm", "ogm-ge", "old", "unimodal-audio", "unimodal-visual"]
    colors = label_colors(order)
    assert list(colors) == order and len({tuple(c) for c in colors.values()}) == len(order)
    many = label_colors([f"m{i}" for i in range(25)])
    assert len(many) == 25 and len({tuple(c) for c in many.values()}) == 25  # no repeats below 26 labels


def test_diagnostics_are_the_method_specific_numbers():
    runs, metrics = synthetic(n_seeds=1)
    ogm = diagnostic_keys(metrics["ogm_ge-ogm-ge-0"])
    assert ("train", "ratio.audio") in ogm and ("train", "modulated") in ogm
    assert not {k for _, k in ogm} & {"loss", "seconds", "samples_per_s"}
    mla = {k for _, k in diagnostic_keys(metrics["mla-mla-0"])}
    assert mla == {"fusion_weight.audio", "fusion_weight.visual", "p_fro"}  # None and bookkeeping dropped


def test_fused_accuracy_shows_the_aggregate(drawn):
    agg, _, _, figs = drawn
    colors = label_colors(list(agg["label"]))
    (ax,) = figs["fused_accuracy"].axes
    series = point_series(ax)
    assert set(series) == {rgb(colors[name]) for name in agg["label"]}  # one series per method, its colour
    for r in agg.itertuples():
        mean, low, high = series[rgb(colors[r.label])]
        assert (mean, low, high) == pytest.approx(tuple(agg.loc[r.Index, ["acc:mean", "acc:ci_low", "acc:ci_high"]]))
    assert [t.get_text() for t in ax.get_yticklabels()] == list(agg["label"])


def test_probe_figure_shows_the_aggregate_against_the_unimodal_probe(drawn):
    agg, _, _, figs = drawn
    colors = label_colors(list(agg["label"]))
    axes = figs["probe_vs_unimodal"].axes
    assert [ax.get_title() for ax in axes] == [f"{DATASET}: audio", f"{DATASET}: visual"]
    rows = agg.set_index("label")
    for ax, m in zip(axes, ("audio", "visual")):
        bars = bar_series(ax)
        assert set(bars) == {rgb(colors[name]) for name in MULTIMODAL}  # the unimodal models are the reference line
        for label in MULTIMODAL:
            assert bars[rgb(colors[label])] == pytest.approx(tuple(rows.loc[label, [f"probe.{m}:{k}" for k in
                                                                                      ("mean", "ci_low", "ci_high")]]))
        ref = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(ref) == 1 and ref[0].get_xdata()[0] == pytest.approx(rows.loc[f"unimodal-{m}", f"probe.{m}:mean"])


def test_trajectories_show_the_mean_over_seeds_per_epoch(drawn):
    agg, runs, metrics, figs = drawn
    colors = label_colors(list(agg["label"]))
    axes = figs["trajectories_modality"].axes
    assert [ax.get_title() for ax in axes] == ["val acc: fused", "val own acc: audio", "val own acc: visual"]
    for label in agg["label"]:
        ids = runs.loc[runs["label"] == label, "run_id"]
        expected = np.mean([[r["val"]["acc"] for r in metrics[rid]] for rid in ids], axis=0)
        lines = [line for line in axes[0].lines if rgb(line.get_color()) == rgb(colors[label])]
        assert len(lines) == 1 and np.asarray(lines[0].get_ydata()) == pytest.approx(expected)


def test_accuracy_vs_cost_shows_the_aggregate(drawn):
    agg, _, _, figs = drawn
    colors = label_colors(list(agg["label"]))
    (ax,) = figs["accuracy_vs_cost"].axes[:1]
    shown = {}
    for bars in ax.containers:
        line, (_, yerr) = bars.lines[0], bars.lines[2]  # the data line; the (x, y) error bar collections
        seg = yerr.get_segments()[0]
        shown[rgb(line.get_color())] = (line.get_ydata()[0], seg[0][1], seg[1][1])
    for r in agg.itertuples():
        expected = tuple(agg.loc[r.Index, ["acc:mean", "acc:ci_low", "acc:ci_high"]])
        assert shown[rgb(colors[r.label])] == pytest.approx(expected)


def test_one_colour_per_method_across_figures_and_readable_labels(drawn):
    agg, _, _, figs = drawn
    colors = {rgb(c) for c in label_colors(list(agg["label"])).values()}
    for stem, fig in figs.items():
        used = {rgb(line.get_color()) for ax in fig.axes for line in ax.lines} | {
            rgb(p.get_facecolor()) for ax in fig.axes for p in ax.patches}
        assert used - colors <= {rgb("black"), rgb("0.5"), rgb(".26")}, stem  # the reference; seaborn's error bars
        assert fig._suptitle.get_text(), stem
        assert_readable(fig)


def test_few_seeds_clip_accuracy_axes_and_say_why():
    runs, metrics = synthetic(n_seeds=2)
    agg = aggregate(runs)
    assert (agg["acc:ci_low"] < 0).any() or (agg["acc:ci_high"] > 1).any()  # t(0.975, 1) = 12.7
    figs = draw_figures(agg, runs, metrics)
    for stem, axis in (("fused_accuracy", "x"), ("probe_vs_unimodal", "x"), ("accuracy_vs_cost", "y"),
                       ("trajectories_modality", "y")):
        for ax in figs[stem].axes:
            if ax.axison and ax.get_xlabel() != "":
                low, high = ax.get_xlim() if axis == "x" else ax.get_ylim()
                assert 0 <= low < high <= 1, (stem, low, high)
        assert "wide because n is small" in figs[stem]._suptitle.get_text(), stem
    assert "clipped to [0, 1]" in figs["fused_accuracy"]._suptitle.get_text()
    narrow = synthetic(n_seeds=3, spread=0.01)
    assert "n is small" not in draw_figures(aggregate(narrow[0]), *narrow)["fused_accuracy"]._suptitle.get_text()


def test_every_figure_from_a_synthetic_table(tmp_path):
    runs, metrics = synthetic()
    assert_files(make_figures(aggregate(runs), runs, metrics, tmp_path / "figs"), tmp_path / "figs")


def test_figures_rendered_in_worker_processes_are_the_same_files_in_the_same_order(tmp_path):
    """A large report draws its figure groups in worker processes: the same files, in the same
    order, with the same images, as drawn here."""
    from PIL import Image

    runs, metrics = synthetic()
    agg = aggregate(runs)
    here = make_figures(agg, runs, metrics, tmp_path / "here", workers=1)
    there = make_figures(agg, runs, metrics, tmp_path / "there", workers=2)
    assert [p.name for p in there] == [p.name for p in here] and len(here) >= 8
    for a, b in zip(here, there):
        if a.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name


def test_two_datasets_one_seed_and_missing_metrics(tmp_path):
    """A dataset per panel (trajectories per dataset, named by it); one seed has no CI; a run
    without metrics and a table without probes do not stop the other figures."""
    runs, metrics = synthetic(n_seeds=1)
    other = runs.assign(dataset="other (preset=x)", run_id=runs["run_id"] + "-b")
    metrics.update({f"{k}-b": v for k, v in metrics.items()})
    del metrics[runs["run_id"].iloc[0]]
    both = pd.concat([runs, other], ignore_index=True).drop(columns=["probe.audio", "probe.visual"])
    paths = make_figures(aggregate(both), both, metrics, tmp_path)
    stems = ["fused_accuracy", "accuracy_vs_cost"] + [f"{s}_{d}" for s in ("trajectories_modality", "diagnostics")
                                                       for d in ("gaussian", "other_preset_x")]
    assert_files(paths, tmp_path, stems)
    assert make_figures(aggregate(runs).iloc[:0], runs.iloc[:0], {}, tmp_path / "empty") == []


def test_every_figure_from_a_real_store(tmp_path, fast_config, store):
    cells = [c for c in CELLS if c[1] != "mla"]  # fewer runs; the synthetic table covers MLA's records
    for label, method, modality in cells:
        extra = [f"method.modality={modality}"] if modality else []
        for seed in (0, 1):
            run(fast_config(f"method.name={method}", *extra, "train.epochs=2", f"train.seed={seed}",
                            f"label={label}", "group=g"), store)
    runs, metrics = load_runs(store.root / "g")
    assert len(runs) == 2 * len(cells)
    assert_files(make_figures(aggregate(runs), runs, metrics, tmp_path / "figs"), tmp_path / "figs")


def with_text(runs: pd.DataFrame, metrics: dict[str, list[dict]], dataset: str) -> tuple[pd.DataFrame, dict]:
    """The synthetic runs as a three-modality dataset: a `text` own/probe on every multimodal run,
    a unimodal-only text model, and a text accuracy in every epoch record."""
    rng = np.random.default_rng(1)
    three = runs.assign(dataset=dataset, run_id=runs["run_id"] + "-3m")
    multimodal = three["unimodal_modality"].isna()
    three.loc[multimodal, "own.text"] = rng.uniform(0.2, 0.4, multimodal.sum())
    three.loc[multimodal, "probe.text"] = rng.uniform(0.3, 0.5, multimodal.sum())
    uni = three[three["label"] == "unimodal-audio"].assign(
        label="unimodal-text", unimodal_modality="text", run_id=lambda d: d["run_id"].str.replace("audio", "text"))
    uni = uni.drop(columns=["own.audio", "probe.audio"]).assign(**{"own.text": 0.6, "probe.text": 0.62})
    three = pd.concat([three, uni], ignore_index=True)
    out = {}
    for rid in three["run_id"]:
        source = rid.removesuffix("-3m").replace("unimodal-text", "unimodal-audio")
        out[rid] = [{**r, "val": {**r["val"], "modality_acc": {**r["val"]["modality_acc"], "text": 0.3}}}
                    for r in metrics[source]]
    return three, out


def test_three_modalities_beside_two(tmp_path):
    """A three-modality dataset beside a two-modality one: the probe figure has a panel per
    modality of each dataset, and none for a modality the dataset lacks; trajectories show each
    dataset's own accuracies; the deficits of text are there for the three-modality block only."""
    runs, metrics = synthetic()
    three, more = with_text(runs, metrics, "three (preset=t)")
    both = add_deficits(pd.concat([runs, three], ignore_index=True))
    metrics = {**metrics, **more}
    agg = aggregate(both)
    figs = draw_figures(agg, both, metrics)
    titles = [ax.get_title() for ax in figs["probe_vs_unimodal"].axes if ax.axison]
    assert titles == [f"{DATASET}: audio", f"{DATASET}: visual",
                      "three (preset=t): audio", "three (preset=t): text", "three (preset=t): visual"]
    text_ax = [ax for ax in figs["probe_vs_unimodal"].axes if ax.get_title() == "three (preset=t): text"][0]
    ref = [line for line in text_ax.lines if line.get_linestyle() == "--"]
    assert len(ref) == 1 and ref[0].get_xdata()[0] == pytest.approx(0.62)
    traj = figs["trajectories_modality_three_preset_t"]
    assert [ax.get_title() for ax in traj.axes] == ["val acc: fused", "val own acc: audio", "val own acc: text",
                                                    "val own acc: visual"]
    assert [ax.get_title() for ax in figs["trajectories_modality_gaussian"].axes] == [
        "val acc: fused", "val own acc: audio", "val own acc: visual"]
    for fig in figs.values():
        assert_readable(fig)
    table = display(agg).set_index(["dataset", "label"])
    assert (table.loc[DATASET, "deficit text (uni − probe)"] == "–").all()
    expected = 0.62 - three.loc[three["label"] == "joint-concat", "probe.text"].mean()
    assert table.loc[("three (preset=t)", "joint-concat"), "deficit text (uni − probe)"].startswith(f"{expected:.3f}")
    per_dataset = [f"{s}_{d}" for s in ("trajectories_modality", "diagnostics") for d in ("gaussian", "three_preset_t")]
    assert_files(make_figures(agg, both, metrics, tmp_path), tmp_path,
                 ["fused_accuracy", "probe_vs_unimodal", "accuracy_vs_cost", *per_dataset])
