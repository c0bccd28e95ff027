"""The report's figures: fused accuracy with CIs, the imbalance picture (probe vs the unimodal-only
model's probe), per-epoch trajectories of per-modality accuracy and of each method's own
diagnostics, and accuracy vs cost. Each is written as PNG and PDF; one colour per label.

Inputs: the aggregate (`bench.report.cells.aggregate`: rows, their order, n and intervals), the
finished runs it was made from (`bench.report.collect.load_runs`) and each run's metrics.jsonl
records by run id. Every mean ± interval drawn is `stats.describe`'s: seaborn gets its bounds as
the `errorbar` callable (never its bootstrap), so the figures show the tables' numbers.
Accuracy axes never leave [0, 1]; when few seeds make an interval run past it, the caption says so.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from mmbalance.bench.report.contribution import contribution_figures  # noqa: E402
from mmbalance.bench.report.stats import ci_bounds, describe  # noqa: E402

DPI = 150
# training-record entries every method has: not a method's own diagnostic
GENERIC_TRAIN_KEYS = {"loss", "seconds", "hook_seconds", "samples_per_s"}
# bookkeeping entries of `method` records that are not a diagnostic worth a panel
BOOKKEEPING_KEYS = {"restored_from_epoch"}
SMALL_N = 3  # below this many seeds a t-interval is wide enough to need saying


def label_colors(labels: list[str]) -> dict[str, Any]:
    """The one colour per label used by every figure: distinct qualitative colours (tab10, then
    Dark2, then Set1 — never the light/dark pairs of tab20), in the order of `labels`."""
    tab10 = list(plt.get_cmap("tab10").colors)
    grey = tab10.pop(7)  # grey reads as "reference"; the black dashed lines are the references
    palette = [*tab10, *plt.get_cmap("Dark2").colors, *plt.get_cmap("Set1").colors, grey]
    unique = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(unique)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def clip_accuracy(ax: Axes, axis: str) -> None:
    """Keep an accuracy axis inside [0, 1] (a 2-seed t-interval can reach −1 … 1.5)."""
    get, put = (ax.get_xlim, ax.set_xlim) if axis == "x" else (ax.get_ylim, ax.set_ylim)
    low, high = get()
    put(max(low, 0.0), min(high, 1.0))


def small_n_note(agg: pd.DataFrame, cols: list[str]) -> str:
    """The caption's warning when an interval of `cols` is wide because n is small: fewer than
    SMALL_N seeds in a row, or an interval past [0, 1]."""
    n = int(agg["n"][agg["n"] > 0].min()) if (agg["n"] > 0).any() else 0
    lows = [agg[f"{c}:ci_low"] for c in cols if f"{c}:ci_low" in agg]
    highs = [agg[f"{c}:ci_high"] for c in cols if f"{c}:ci_high" in agg]
    past = any((s < 0).any() for s in lows) or any((s > 1).any() for s in highs)
    if n >= SMALL_N and not past:
        return ""
    return (f"\nn = {n} seed(s) in some rows: the 95% t-intervals are wide because n is small"
            + (", and run past the accuracy axis (clipped to [0, 1])" if past else ""))


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return paths


def _label_legend(fig: Figure, labels: list[str], colors: dict[str, Any], extra: list | None = None) -> None:
    """A figure-level legend of method labels to the right of all panels (never over data)."""
    handles = [plt.Line2D([], [], color=colors[name], marker="o", linestyle="-", label=name) for name in labels]
    fig.legend(handles=handles + (extra or []), loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False, fontsize=9)


def _rows(agg: pd.DataFrame, ds: str, multimodal: bool = False) -> list[str]:
    """The labels of dataset `ds` in the aggregate's order (without unimodal-only ones if asked)."""
    rows = agg[(agg["dataset"] == ds) & (agg["n"] > 0)]
    return list(rows.loc[rows["method"] != "unimodal", "label"] if multimodal else rows["label"])


# ---- (1) fused accuracy per label with 95% t-CIs, one panel per dataset
def fused_accuracy(agg: pd.DataFrame, runs: pd.DataFrame, colors: dict[str, Any]) -> Figure:
    datasets = list(dict.fromkeys(agg["dataset"]))
    height = 0.42 * max(len(_rows(agg, ds)) for ds in datasets) + 1.6
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), height), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub, order = runs[runs["dataset"] == ds], _rows(agg, ds)
        sns.pointplot(data=sub, x="acc", y="label", order=order, hue="label", hue_order=order, palette=colors,
                      legend=False, ax=ax, errorbar=ci_bounds, linestyle="none", capsize=0.3, markersize=7)
        for y, label in enumerate(order):  # single seeds just below their mean's line
            acc = sub.loc[sub["label"] == label, "acc"]
            ax.scatter(acc, np.full(len(acc), y + 0.22), s=10, color=colors[label], alpha=0.5)
        clip_accuracy(ax, "x")
        ax.set(xlabel="fused test accuracy", ylabel="", title=ds)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Fused accuracy: mean with 95% t-CI over seeds (small dots: single seeds)"
                 + small_n_note(agg, ["acc"]), fontsize=10)
    fig.tight_layout()
    return fig


# ---- (2) the imbalance picture: each method's probe per modality vs the unimodal-only model's probe
def probe_vs_unimodal(agg: pd.DataFrame, runs: pd.DataFrame, colors: dict[str, Any]) -> Figure | None:
    modalities = {ds: _probed(runs[runs["dataset"] == ds]) for ds in dict.fromkeys(agg["dataset"])}
    datasets = [ds for ds in modalities if modalities[ds] and _rows(agg, ds, multimodal=True)]
    if not datasets:
        return None
    height = 0.42 * max(len(_rows(agg, ds, multimodal=True)) for ds in datasets) + 1.4
    ncols = max(len(modalities[ds]) for ds in datasets)  # a dataset's row: its own modalities only
    fig, axes = plt.subplots(len(datasets), ncols, squeeze=False,
                             figsize=(4.2 * ncols + 1.5, height * len(datasets)))
    ref = None
    for row, ds in zip(axes, datasets):
        sub, order = runs[runs["dataset"] == ds], _rows(agg, ds, multimodal=True)
        for ax in row[len(modalities[ds]):]:
            ax.axis("off")
        for ax, m in zip(row, modalities[ds]):
            sns.barplot(data=sub, x=f"probe.{m}", y="label", order=order, hue="label", hue_order=order,
                        palette=colors, saturation=1, legend=False, errorbar=ci_bounds, capsize=0.3, ax=ax)
            uni = describe(sub.loc[(sub["method"] == "unimodal") & (sub["unimodal_modality"] == m), f"probe.{m}"])
            if uni["n"]:
                if uni["n"] > 1:
                    ax.axvspan(uni["ci_low"], uni["ci_high"], color="0.5", alpha=0.25, linewidth=0, zorder=0)
                ref = ax.axvline(uni["mean"], color="black", linestyle="--", linewidth=1.4, zorder=3,
                                 label="unimodal-only model of the modality\n(its probe: mean, 95% CI)")
            clip_accuracy(ax, "x")
            ax.set(xlabel=f"linear-probe test acc ({m})", ylabel="", title=f"{ds}: {m}")
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Imbalance: frozen-encoder probe per modality vs that modality trained alone"
                 + small_n_note(agg, [f"probe.{m}" for ds in datasets for m in modalities[ds]]), fontsize=10)
    fig.tight_layout()
    if ref is not None:
        fig.legend(handles=[ref], loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    return fig


def _probed(runs: pd.DataFrame) -> list[str]:
    """The modalities with a probe value in `runs` (one dataset's: M of them), sorted."""
    return sorted(c.split(".", 1)[1] for c in runs if c.startswith("probe.") and runs[c].notna().any())


# ---- (3a) per-epoch val accuracy per modality, one line per label (mean over seeds, band = 95% CI)
def _long(metrics: dict[str, list[dict]], runs: pd.DataFrame, get) -> pd.DataFrame:
    """(label, run_id, epoch, panel, line, value) for every finite number `get(record)` yields as
    {(panel, line): value}."""
    rows = []
    for rid, label in zip(runs["run_id"], runs["label"]):
        for r in metrics.get(rid, []):
            for (panel, line), v in get(r).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    rows.append((label, rid, r["epoch"], panel, line, float(v)))
    return pd.DataFrame(rows, columns=["label", "run_id", "epoch", "panel", "line", "value"])


def _val_accuracies(r: dict) -> dict[tuple[str, str], Any]:
    val = r.get("val") or {}
    out = {("val acc: fused", ""): val.get("acc")}
    out.update({(f"val own acc: {m}", ""): v for m, v in (val.get("modality_acc") or {}).items()})
    return out


def modality_trajectories(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]],
                          colors: dict[str, Any], ds: str) -> Figure | None:
    order = _rows(agg, ds)
    data = _long(metrics, runs[runs["dataset"] == ds], _val_accuracies)
    if data.empty:
        return None
    panels = ["val acc: fused"] + sorted(p for p in data["panel"].unique() if p != "val acc: fused")
    grid = sns.relplot(data=data, x="epoch", y="value", col="panel", col_order=panels, hue="label",
                       hue_order=[name for name in order if name in set(data["label"])], palette=colors, kind="line",
                       errorbar=ci_bounds, marker=".", height=3.4, aspect=1.2, legend=False)
    grid.set_titles("{col_name}").set_axis_labels("epoch", "validation accuracy")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        clip_accuracy(ax, "y")
        ax.grid(alpha=0.3)
    grid.figure.suptitle(f"{ds}: per-epoch validation accuracy (mean over seeds, band = 95% t-CI)"
                         + small_n_note(agg[agg["dataset"] == ds], []), fontsize=10)
    grid.figure.tight_layout()
    _label_legend(grid.figure, list(dict.fromkeys(name for name in order if name in set(data["label"]))), colors)
    return grid.figure


# ---- (3b) each method's own per-epoch diagnostics: numeric `method` entries and method-specific
# training terms (OGM-GE ratio/coef, MLA fusion weights, MIE stage/λ, DI-MML loss terms)
def diagnostic_keys(records: list[dict]) -> list[tuple[str, str]]:
    """(section, key) of every numeric method-specific entry in a run's records."""
    keys: dict[tuple[str, str], None] = {}
    for r in records:
        for section in ("method", "train"):
            for k, v in (r.get(section) or {}).items():
                if (section == "train" and k in GENERIC_TRAIN_KEYS) or k in BOOKKEEPING_KEYS:
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys[(section, k)] = None
    return list(keys)


def _panel_name(key: str) -> tuple[str, str]:
    """'ratio.audio' -> panel 'ratio', line 'audio'; 'loss_sam' -> panel 'loss', line 'sam';
    'lam' -> panel 'lam', line ''."""
    if "." not in key and key.startswith("loss_"):
        return "loss", key[len("loss_"):]
    head, _, tail = key.partition(".")
    return head, tail


def _diagnostics(r: dict) -> dict[tuple[str, str], Any]:
    return {_panel_name(k): r[s][k] for s, k in diagnostic_keys([r])}


def method_diagnostics(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]],
                       colors: dict[str, Any], ds: str) -> Figure | None:
    sub = runs[(runs["dataset"] == ds) & (runs["method"] != "unimodal") & ~runs["method"].str.startswith("joint")]
    data = _long(metrics, sub, _diagnostics)  # joint and unimodal have no method of their own
    labels = [name for name in _rows(agg, ds) if name in set(data["label"])]
    if not labels:
        return None
    panels = {name: sorted(data.loc[data["label"] == name, "panel"].unique()) for name in labels}
    ncols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(labels), ncols, figsize=(3.6 * ncols, 2.7 * len(labels)), squeeze=False)
    for row, label in zip(axes, labels):
        for ax, panel in zip(row, panels[label]):
            lines = data[(data["label"] == label) & (data["panel"] == panel)]
            styled = (lines["line"] != "").any()
            sns.lineplot(data=lines, x="epoch", y="value", style="line" if styled else None, markers=True,
                         color=colors[label], errorbar=ci_bounds, ax=ax, legend=styled)
            ax.set_title(f"{label}: {panel}", fontsize=9, color=colors[label])
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel(panel, fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if styled:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, handlelength=3)
        for ax in row[len(panels[label]):]:
            ax.axis("off")
    fig.suptitle(f"{ds}: each method's own diagnostics per epoch (mean over seeds, band = 95% t-CI)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ---- (4) accuracy vs cost
def accuracy_vs_cost(agg: pd.DataFrame, runs: pd.DataFrame, colors: dict[str, Any]) -> Figure | None:
    if "s_per_epoch" not in runs or runs["s_per_epoch"].isna().all():
        return None
    datasets = list(dict.fromkeys(agg["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = runs[runs["dataset"] == ds]
        for label in _rows(agg, ds):
            cost = sub.loc[sub["label"] == label, "s_per_epoch"].dropna()
            if cost.empty:
                continue
            # timings are skewed (a warm-up run is slow): median and min–max, not a t-interval
            mid, (mean, low, high) = cost.median(), _interval(agg, ds, label, "acc")
            ax.errorbar(mid, mean, xerr=[[mid - cost.min()], [cost.max() - mid]],
                        yerr=[[mean - low], [high - mean]], fmt="o", color=colors[label], capsize=3, markersize=7)
        costs = sub["s_per_epoch"].dropna()
        if len(costs) and costs.min() > 0 and costs.max() / costs.min() > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        clip_accuracy(ax, "y")
        ax.set(xlabel="seconds per training epoch (median, bar = min–max)", ylabel="fused test accuracy", title=ds)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs cost over seeds (accuracy: mean, 95% t-CI)" + small_n_note(agg, ["acc"]), fontsize=10)
    fig.tight_layout()
    _label_legend(fig, list(dict.fromkeys(agg["label"])), colors)
    return fig


def _interval(agg: pd.DataFrame, ds: str, label: str, col: str) -> tuple[float, float, float]:
    """(mean, low, high) of `col` in the aggregate's row; a single seed has a zero-width interval."""
    r = agg[(agg["dataset"] == ds) & (agg["label"] == label)].iloc[0]
    mean = r[f"{col}:mean"]
    low, high = (r[f"{col}:ci_low"], r[f"{col}:ci_high"]) if r[f"{col}:n"] > 1 else (mean, mean)
    return mean, low, high


# groups of figures drawn together (one process each when the report renders in parallel), in
# the order the report lists them: (function, its arguments after agg, runs, metrics and colors)
FigureGroup = tuple[Any, tuple]
# below this many finished runs a report draws its figures in this process: starting a worker
# (importing matplotlib, seaborn, pandas) costs about 2 s, more than small figures take
PARALLEL_MIN_RUNS = 24


def _summary_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict, colors: dict) -> dict[str, Figure | None]:
    return {"fused_accuracy": fused_accuracy(agg, runs, colors),
            "probe_vs_unimodal": probe_vs_unimodal(agg, runs, colors)}


def _dataset_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict, colors: dict, ds: str,
                     suffix: str) -> dict[str, Figure | None]:
    return {f"trajectories_modality{suffix}": modality_trajectories(agg, runs, metrics, colors, ds),
            f"diagnostics{suffix}": method_diagnostics(agg, runs, metrics, colors, ds)}


def _contribution_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict, colors: dict) -> dict:
    return contribution_figures(agg, runs, metrics, colors, _slug)


def _cost_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict, colors: dict) -> dict[str, Figure | None]:
    return {"accuracy_vs_cost": accuracy_vs_cost(agg, runs, colors)}


def figure_groups(agg: pd.DataFrame) -> list[FigureGroup]:
    datasets = list(dict.fromkeys(agg["dataset"]))
    per_dataset = [(_dataset_figures, (ds, "" if len(datasets) == 1 else f"_{_slug(ds)}")) for ds in datasets]
    return [(_summary_figures, ()), *per_dataset, (_contribution_figures, ()), (_cost_figures, ())]


def draw_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]]) -> dict[str, Figure]:
    """{file stem: figure} for every figure the runs support; a figure whose data is absent (no
    probes, no metrics) is left out, not drawn empty. `runs` are the finished runs of `agg`."""
    if runs.empty:
        return {}
    colors = label_colors(list(agg["label"]))
    figures: dict[str, Figure | None] = {}
    for draw, args in figure_groups(agg):
        figures.update(draw(agg, runs, metrics, colors, *args))
    return {stem: fig for stem, fig in figures.items() if fig is not None}


def render_group(group: FigureGroup, agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]],
                 out_dir: Path) -> list[Path]:
    """Draw one group of figures and write them (in a worker process, or here); their paths."""
    draw, args = group
    figures = draw(agg, runs, metrics, label_colors(list(agg["label"])), *args)
    return [p for stem, fig in figures.items() if fig is not None for p in _save(fig, out_dir, stem)]


def make_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]], out_dir: Path,
                 workers: int | None = None) -> list[Path]:
    """Write every figure of `draw_figures` to `out_dir` as PNG and PDF; returns their paths, in
    draw_figures' order. The groups render in `workers` processes (default: the cores this process
    may use, for a report of PARALLEL_MIN_RUNS runs or more; the quickstart's 168 take about half
    the time on 2 cores), each a fresh interpreter: never a fork of a process that may hold torch's
    threads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        return []
    groups = figure_groups(agg)
    if workers is None:
        from mmbalance.bench.threads import cpu_share

        workers = cpu_share() if len(runs) >= PARALLEL_MIN_RUNS else 1
    if min(workers, len(groups)) <= 1:
        return [p for g in groups for p in render_group(g, agg, runs, metrics, out_dir)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(groups)), mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [pool.submit(render_group, g, agg, runs, metrics, out_dir) for g in groups]
        return [p for future in done for p in future.result()]
