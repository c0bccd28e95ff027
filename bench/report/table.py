"""The comparison table of a group of runs: mean ± std over seeds, one row per cell.

Columns, all on the test split at the best-validation epoch unless named otherwise:
fused accuracy; the method's own per-modality accuracy ("own"); the frozen-encoder linear probe
per modality ("probe") and its gap to the unimodal-only model of that modality ("Δ vs uni", where
the group has one); the best-on-test accuracy (the papers' protocol, labelled); seconds per epoch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report.collect import run_row
from bench.store import Store, atomic_write_text


def run_rows(store: Store, group: str) -> pd.DataFrame:
    """One row per finished run of `group`: the report's row (bench.report.collect) at the
    best-validation epoch, with `dataset` the full dataset config so that presets stay apart."""
    rows = [run_row(rd, "best_val") for rd in store.runs(group)]
    rows = [{**r, "dataset": r["dataset_config"]} for r in rows if "acc" in r]
    return pd.DataFrame(rows)


def add_unimodal_gaps(runs: pd.DataFrame) -> pd.DataFrame:
    """`gap.<m>` = probe accuracy of modality m minus the mean accuracy of the unimodal-only
    model of m on the same dataset config: negative means the encoder learned less than alone."""
    runs = runs.copy()
    uni = runs[runs["method"] == "unimodal"]
    for (dataset, modality), refs in uni.groupby(["dataset", "unimodal_modality"]):
        col = f"probe.{modality}"
        if col in runs:
            same = runs["dataset"] == dataset
            runs.loc[same, f"gap.{modality}"] = runs.loc[same, col] - refs["acc"].mean()
    return runs


def mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


KIND_ORDER = ("own", "probe", "gap")


def summary_table(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean ± std (sample std over seeds) per label, in `order` (default: as they first appear)."""
    runs = add_unimodal_gaps(runs)
    per_modality = [c for c in runs if c.split(".")[0] in KIND_ORDER]
    metric_cols = ["acc"] + sorted(per_modality, key=lambda c: (KIND_ORDER.index(c.split(".")[0]), c))
    metric_cols += ["acc_best_test", "s_per_epoch"]
    names = {"acc": "fused acc", "acc_best_test": "fused acc (best-on-test)", "s_per_epoch": "s/epoch"}
    for c in metric_cols:
        kind, _, m = c.partition(".")
        if m:
            names[c] = {"own": f"own {m}", "probe": f"probe {m}", "gap": f"probe {m} Δ vs uni"}[kind]
    rows = []
    groups = dict(list(runs.groupby("label", sort=False)))
    for label in order or list(groups):
        if label not in groups:
            continue
        g = groups[label]
        row = {"cell": label, "seeds": len(g)}
        row.update({names[c]: mean_std(g[c]) for c in metric_cols if c in g})
        rows.append(row)
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, runs: pd.DataFrame, out_dir: Path, title: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "table.md"
    atomic_write_text(md, f"# {title}\n\n{table.to_markdown(index=False)}\n\n{LEGEND}\n")
    atomic_write_text(out_dir / "table.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False))
    return md


LEGEND = (
    "Test split at the best-validation epoch, mean ± std over seeds. own = the method's own "
    "per-modality logits; probe = linear probe on the frozen encoder (C chosen on val); "
    "Δ vs uni = probe minus the unimodal-only model of that modality (negative: the encoder "
    "learned less in the multimodal model than alone); best-on-test = the papers' selection, "
    "optimistic."
)
