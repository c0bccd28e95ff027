"""The report's figures: fused accuracy with CIs, the imbalance picture (probe vs unimodal-only),
per-epoch trajectories of per-modality accuracy and of each method's own diagnostics, and
accuracy vs cost. Each figure is written as PNG and PDF; colours follow one mapping per label.

Inputs are the runs table of `bench.report.table.run_rows` (one row per finished run) and each
run's metrics.jsonl records (`RunDir.read_metrics`), keyed by run_id.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
from scipy import stats  # noqa: E402

DPI = 150
# training-record entries every method has: not a method's own diagnostic
GENERIC_TRAIN_KEYS = {"loss", "seconds", "samples_per_s"}
# bookkeeping entries of `method` records that are not a diagnostic worth a panel
BOOKKEEPING_KEYS = {"restored_from_epoch"}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def label_order(runs: pd.DataFrame) -> list[str]:
    """Labels in the order every figure lists them: joint baselines, then the imbalance methods,
    then the unimodal-only references; alphabetical within each group, so one set of labels gets
    one order (and one set of colours) whatever order the runs were read in."""
    first = runs.drop_duplicates("label")
    group = {"joint": 0, "unimodal": 2}
    keyed = [(group.get(str(method).split("_")[0], 1), label) for label, method in zip(first["label"], first["method"])]
    return [label for _, label in sorted(keyed)]


def label_colors(labels: list[str]) -> dict[str, Any]:
    """The one colour per label used by every figure: distinct qualitative colours (tab10, then
    Dark2, then Set1 — never the light/dark pairs of tab20), in the order of `labels`."""
    tab10 = list(plt.get_cmap("tab10").colors)
    grey = tab10.pop(7)  # grey reads as "reference"; the black dashed lines are the references
    palette = [*tab10, *plt.get_cmap("Dark2").colors, *plt.get_cmap("Set1").colors, grey]
    unique = list(dict.fromkeys(labels))
    return {label: palette[i % len(palette)] for i, label in enumerate(unique)}


def t_interval(values: pd.Series | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t confidence interval (0 for a single seed)."""
    v = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), 0.0
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def dataset_names(runs: pd.DataFrame) -> dict[str, str]:
    """A short readable name per dataset config (its `name`, numbered when configs share one)."""
    names: dict[str, str] = {}
    for config in dict.fromkeys(runs["dataset"]):
        try:
            name = json.loads(config).get("name", str(config))
        except (TypeError, ValueError, AttributeError):
            name = str(config)
        n = sum(1 for v in names.values() if v == name or v.startswith(f"{name} #"))
        names[config] = name if n == 0 else f"{name} #{n + 1}"
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _modalities(runs: pd.DataFrame, kind: str) -> list[str]:
    return sorted(c.split(".", 1)[1] for c in runs.columns if c.startswith(f"{kind}.") and runs[c].notna().any())


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return paths


def _label_legend(fig: Figure, labels: list[str], colors: dict[str, Any], **extra: Any) -> None:
    """A figure-level legend of method labels to the right of all panels (never over data)."""
    handles = [plt.Line2D([], [], color=colors[l], marker="o", linestyle="-", label=l) for l in labels]
    handles += extra.pop("handles", [])
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)


# ---- (1) fused accuracy per label with 95% t-CIs, one panel per dataset
def fused_accuracy(runs: pd.DataFrame, colors: dict[str, Any], out_dir: Path) -> list[Path]:
    order = list(colors)
    names = dataset_names(runs)
    datasets = list(names)
    n_labels = runs["label"].nunique()
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 0.42 * n_labels + 1.4),
                             squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = runs[runs["dataset"] == ds]
        labels = [l for l in order if l in set(sub["label"])]
        for y, label in enumerate(labels):
            acc = sub.loc[sub["label"] == label, "acc"]
            mean, half = t_interval(acc)
            ax.errorbar(mean, y, xerr=half, fmt="o", color=colors[label], capsize=4, markersize=7)
            ax.scatter(acc, np.full(len(acc), y + 0.22), s=10, color=colors[label], alpha=0.5)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("fused test accuracy (best-val epoch)")
        ax.set_title(names[ds])
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Fused accuracy: mean with 95% t-CI over seeds (small dots: single seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "fused_accuracy")


# ---- (2) the imbalance picture: probe accuracy per modality vs the unimodal-only model
def probe_vs_unimodal(runs: pd.DataFrame, colors: dict[str, Any], out_dir: Path) -> list[Path] | None:
    names = dataset_names(runs)
    modalities = _modalities(runs, "probe")
    if not modalities:
        return None
    multi = runs[runs["method"] != "unimodal"]
    order = [l for l in colors if l in set(multi["label"])]
    n_labels = max(multi["label"].nunique(), 1)
    fig, axes = plt.subplots(len(names), len(modalities), squeeze=False,
                             figsize=(0.5 * n_labels * len(modalities) + 2.5, 3.6 * len(names)))
    ref_handle = None
    for row, ds in zip(axes, names):
        sub = multi[multi["dataset"] == ds]
        uni = runs[(runs["dataset"] == ds) & (runs["method"] == "unimodal")]
        labels = [l for l in order if l in set(sub["label"])]
        for ax, m in zip(row, modalities):
            for x, label in enumerate(labels):
                mean, half = t_interval(sub.loc[sub["label"] == label, f"probe.{m}"])
                if not math.isnan(mean):
                    ax.bar(x, mean, yerr=half, color=colors[label], capsize=3, width=0.75)
            refs = uni.loc[uni["unimodal_modality"] == m, "acc"]
            if len(refs):
                mean, half = t_interval(refs)
                ax.axhspan(mean - half, mean + half, color="0.5", alpha=0.25, linewidth=0, zorder=0)
                ref_handle = ax.axhline(mean, color="black", linestyle="--", linewidth=1.4, zorder=3,
                                        label="unimodal-only model of the modality\n(test acc, mean, 95% CI)")
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{names[ds]}: {m}")
            ax.set_ylabel(f"linear-probe test acc ({m})")
            ax.grid(axis="y", alpha=0.3)
    labels_all = order
    fig.suptitle("Imbalance: frozen-encoder probe per modality vs that modality trained alone", fontsize=10)
    fig.tight_layout()
    extra = [ref_handle] if ref_handle is not None else []
    _label_legend(fig, labels_all, colors, handles=extra)
    return _save(fig, out_dir, "probe_vs_unimodal")


# ---- (3a) per-epoch val accuracy per modality, one line per label (mean over seeds, band = range)
def _series(records: list[dict], get) -> pd.Series:
    values = {}
    for r in records:
        try:
            v = get(r)
        except (KeyError, TypeError):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
            values[r["epoch"]] = float(v)
    return pd.Series(values, dtype=float)


def _band(ax, frame: pd.DataFrame, color, label: str | None = None, style: int | None = None) -> None:
    """Mean over runs (columns) per epoch with the min–max band across seeds; `style` picks a
    line style and marker so lines of one colour stay apart."""
    frame = frame.sort_index()
    linestyle, marker = ("-", ".") if style is None else (LINESTYLES[style % 4], MARKERS[style % 4])
    ax.plot(frame.index, frame.mean(axis=1), color=color, linestyle=linestyle, marker=marker,
            markersize=4, label=label)
    if frame.shape[1] > 1:
        ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), color=color, alpha=0.15, linewidth=0)


def modality_trajectories(runs: pd.DataFrame, metrics: dict[str, list[dict]], colors: dict[str, Any],
                          out_dir: Path, ds: str, suffix: str) -> list[Path] | None:
    sub = runs[runs["dataset"] == ds]
    panels: list[tuple[str, Any]] = [("fused", lambda r: r["val"]["acc"])]
    modalities = sorted({m for rid in sub["run_id"] for r in metrics.get(rid, [])
                         for m in r.get("val", {}).get("modality_acc", {})})
    panels += [(m, lambda r, m=m: r["val"]["modality_acc"][m]) for m in modalities]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    drawn: list[str] = []
    for ax, (name, get) in zip(axes[0], panels):
        for label in [l for l in colors if l in set(sub["label"])]:
            g = sub[sub["label"] == label]
            cols = {rid: _series(metrics.get(rid, []), get) for rid in g["run_id"]}
            frame = pd.DataFrame({k: v for k, v in cols.items() if len(v)})
            if frame.empty:
                continue
            _band(ax, frame, colors[label])
            drawn.append(label)
        ax.set_title(f"val acc: {name}" if name == "fused" else f"val own acc: {name}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy")
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"{dataset_label(ds, runs)}: per-epoch validation accuracy (mean over seeds, band = min–max)",
                 fontsize=10)
    fig.tight_layout()
    _label_legend(fig, list(dict.fromkeys(drawn)), colors)
    return _save(fig, out_dir, f"trajectories_modality{suffix}")


def dataset_label(ds: str, runs: pd.DataFrame) -> str:
    return dataset_names(runs)[ds]


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


def method_diagnostics(runs: pd.DataFrame, metrics: dict[str, list[dict]], colors: dict[str, Any],
                       out_dir: Path, ds: str, suffix: str) -> list[Path] | None:
    sub = runs[runs["dataset"] == ds]
    per_label: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
    for label in [l for l in colors if l in set(sub["label"])]:
        g = sub[sub["label"] == label]
        if (g["method"] == "unimodal").all() or str(g["method"].iloc[0]).startswith("joint"):
            continue  # no method of their own to diagnose
        keys = {k for rid in g["run_id"] for k in diagnostic_keys(metrics.get(rid, []))}
        panels: dict[str, list[tuple[str, str, str]]] = {}
        for section, key in sorted(keys, key=lambda sk: (sk[0] != "method", sk[1])):
            head, tail = _panel_name(key)
            panels.setdefault(head, []).append((section, key, tail))
        if panels:
            per_label[label] = panels
    if not per_label:
        return None
    ncols = max(len(p) for p in per_label.values())
    fig, axes = plt.subplots(len(per_label), ncols, figsize=(3.3 * ncols, 2.6 * len(per_label)), squeeze=False)
    for row, (label, panels) in zip(axes, per_label.items()):
        run_ids = sub.loc[sub["label"] == label, "run_id"]
        for ax, (head, lines) in zip(row, panels.items()):
            for i, (section, key, tail) in enumerate(lines):
                cols = {rid: _series(metrics.get(rid, []), lambda r: r[section][key]) for rid in run_ids}
                frame = pd.DataFrame({k: v for k, v in cols.items() if len(v)})
                if not frame.empty:
                    _band(ax, frame, colors[label], label=tail or None, style=i)
            ax.set_title(f"{label}: {head}", fontsize=9, color=colors[label])
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if any(tail for *_, tail in lines):
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, handlelength=3)
        for ax in row[len(panels):]:
            ax.axis("off")
    fig.suptitle(f"{dataset_label(ds, runs)}: each method's own diagnostics per epoch "
                 "(mean over seeds, band = min–max)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, f"diagnostics{suffix}")


# ---- (4) accuracy vs cost
def accuracy_vs_cost(runs: pd.DataFrame, colors: dict[str, Any], out_dir: Path) -> list[Path] | None:
    names = dataset_names(runs)
    if runs["s_per_epoch"].isna().all():
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], names):
        sub = runs[runs["dataset"] == ds]
        for label in [l for l in colors if l in set(sub["label"])]:
            g = sub[sub["label"] == label]
            acc, acc_h = t_interval(g["acc"])
            cost = g["s_per_epoch"].dropna()
            if cost.empty:
                continue
            # timings are skewed (a warm-up run is slow): median and min–max, not a t-interval
            mid = cost.median()
            ax.errorbar(mid, acc, xerr=[[mid - cost.min()], [cost.max() - mid]], yerr=acc_h, fmt="o",
                        color=colors[label], capsize=3, markersize=7)
        costs = sub["s_per_epoch"].dropna()
        if len(costs) and costs.min() > 0 and costs.max() / costs.min() > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("seconds per training epoch (median, bar = min–max)")
        ax.set_ylabel("fused test accuracy")
        ax.set_title(names[ds])
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs cost over seeds (accuracy: mean, 95% t-CI)", fontsize=10)
    fig.tight_layout()
    _label_legend(fig, list(colors), colors)
    return _save(fig, out_dir, "accuracy_vs_cost")


def make_figures(runs: pd.DataFrame, metrics_by_run: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Write every figure the runs support to `out_dir` (PNG and PDF each); returns their paths.
    A figure whose data is absent (no probes, no metrics) is skipped, not drawn empty."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runs.empty:
        return []
    colors = label_colors(label_order(runs))
    paths: list[Path] = []
    paths += fused_accuracy(runs, colors, out_dir)
    paths += probe_vs_unimodal(runs, colors, out_dir) or []
    names = dataset_names(runs)
    for ds, name in names.items():
        suffix = "" if len(names) == 1 else f"_{_slug(name)}"
        paths += modality_trajectories(runs, metrics_by_run, colors, out_dir, ds, suffix) or []
        paths += method_diagnostics(runs, metrics_by_run, colors, out_dir, ds, suffix) or []
    paths += accuracy_vs_cost(runs, colors, out_dir) or []
    return paths
