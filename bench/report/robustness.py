"""The report's robustness section (runs' robustness.json, written by bench.robustness): a table
robustness.{md,csv}, dataset × label × modality × condition (zeroed, or a noise level), mean ±
std over seeds from the one aggregation (`cells.aggregate` on the fused accuracy under that
condition), and a figure per dataset: accuracy vs corruption level, one panel per modality, one
colour per label (figures.label_colors), the zeroed modality as the last point. Nothing is written
when no run has robustness results.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mmbalance.bench.report.cells import aggregate, fmt
from mmbalance.bench.store import atomic_write_text, run_dirs
from mmbalance.core.errors import DamagedFile

log = logging.getLogger(__name__)

ZEROED = "zeroed"
NOTE = ("Fused test accuracy of the best-val checkpoint with one modality corrupted at test (bench/robustness.py): "
        "'noise l' adds l × (the modality's input std on the test split) × N(0, 1) to a float input, or replaces "
        "each token of a token-id input with probability min(l, 1) by an id of the split; noise 0 is the clean "
        "input; 'zeroed' replaces the modality's input by zeros. Mean ± std over seeds (n).")


def long_results(results_dir: Path, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run of `runs` with a robustness.json × modality × condition: the run's
    key columns, `modality`, `condition` ('zeroed' or the level as text), `level` (NaN for
    zeroed) and `acc`; and a line per damaged robustness.json, left out (the file and why)."""
    dirs = {(rd.path.parent.name, rd.run_id): rd for rd in run_dirs(results_dir)}
    rows, damaged = [], []
    for run in runs[runs["state"] == "finished"].itertuples():
        rd = dirs.get((run.group, run.run_id))
        try:
            result = rd.read_robustness() if rd else None
        except DamagedFile as e:
            damaged.append(f"{run.group}/{run.run_id}/{e.path.name}: {e.why}")
            continue
        if result is None:
            continue
        for m, entry in result["modalities"].items():
            rows.append({"run_id": run.run_id, "modality": m, "condition": ZEROED, "level": float("nan"),
                         "acc": entry["zeroed"]})
            rows += [{"run_id": run.run_id, "modality": m, "condition": f"noise {float(level):g}",
                      "level": float(level), "acc": acc} for level, acc in entry["noise"].items()]
    if not rows:
        return pd.DataFrame(), damaged
    keys = [c for c in ("run_id", "group", "dataset", "label", "method", "family", "seed", "state") if c in runs]
    return pd.DataFrame(rows).merge(runs[keys], on="run_id"), damaged


def conditions(long: pd.DataFrame) -> list[str]:
    """The conditions in the table's order: noise levels ascending, then zeroed."""
    levels = sorted(long.loc[long["condition"] != ZEROED, "level"].unique())
    return [f"noise {v:g}" for v in levels] + [ZEROED]


def robustness_table(long: pd.DataFrame, main: pd.DataFrame, order: list[str] | None) -> pd.DataFrame:
    """dataset, label, modality, condition, n, acc mean/std and 'mean ± std': `cells.aggregate`
    over the runs of each (modality, condition); rows in the order of `main` (the report's aggregate)."""
    blocks = []
    for (m, cond), g in long.groupby(["modality", "condition"], sort=False):
        agg = aggregate(g, order)
        blocks.append(agg[["dataset", "label", "n"]].assign(
            modality=m, condition=cond, mean=agg["acc:mean"], std=agg["acc:std"], n_acc=agg["acc:n"]))
    table = pd.concat(blocks, ignore_index=True)
    rows = {key: i for i, key in enumerate(zip(main["dataset"], main["label"]))}
    rank = {c: i for i, c in enumerate(conditions(long))}
    table = table.assign(row_rank=[rows[key] for key in zip(table["dataset"], table["label"])],
                         cond_rank=table["condition"].map(rank))
    table = table.sort_values(["row_rank", "modality", "cond_rank"], kind="stable")
    table["acc"] = [fmt(mean, std, k, of) for mean, std, k, of in zip(table["mean"], table["std"], table["n_acc"],
                                                                       table["n"])]
    return table[["dataset", "label", "modality", "condition", "n", "acc", "mean", "std"]].reset_index(drop=True)


def wide(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """The markdown view: one row per dataset × label × modality, one column per condition."""
    out = table.pivot_table(index=["dataset", "label", "modality"], columns="condition", values="acc",
                            aggfunc="first", sort=False)
    return out[[c for c in order if c in out]].reset_index()


def robustness_figure(long: pd.DataFrame, ds: str, labels: list[str], colors: dict):
    """Accuracy vs corruption level for dataset `ds`: one panel per modality, zeroed last."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from mmbalance.bench.report.figures import _label_legend, clip_accuracy
    from mmbalance.bench.report.stats import ci_bounds

    sub = long[long["dataset"] == ds]
    modalities = sorted(sub["modality"].unique())
    order = [label for label in dict.fromkeys(labels) if label in set(sub["label"])]
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.6 * len(modalities), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], modalities):
        panel = sub[sub["modality"] == m]
        for zero in (False, True):  # the zeroed point apart: not a level on the noise curve
            sns.pointplot(data=panel[(panel["condition"] == ZEROED) == zero], x="condition", y="acc",
                          order=conditions(sub), hue="label", hue_order=order, palette=colors, errorbar=ci_bounds,
                          capsize=0.2, markersize=5, dodge=0.3, legend=False, ax=ax,
                          linestyle="none" if zero else "-")
        clip_accuracy(ax, "y")
        ax.set(title=f"{m} corrupted", xlabel="", ylabel="fused test accuracy")
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(axis="y", alpha=0.3)
    _label_legend(fig, order, colors)
    fig.suptitle(f"{ds}: robustness (mean with 95% t-CI over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def write_robustness(results_dir: Path, runs: pd.DataFrame, agg: pd.DataFrame, order: list[str] | None,
                     out: Path) -> tuple[list[Path], list[tuple[str, pd.DataFrame, str]], list[Path]]:
    """(table files, report sections, figure files) of the robustness results; all empty when no
    run has any."""
    from mmbalance.bench.report.figures import _save, _slug, label_colors

    long, damaged = long_results(results_dir, runs)
    for line in damaged:
        log.warning(f"robustness: left out {line}; `mmbalance evaluate-robustness` on the run writes it again")
    if long.empty:
        return [], [], []
    table = robustness_table(long, agg, order)
    view = wide(table, conditions(long))
    note = NOTE + "".join(f" Left out, damaged: {line}." for line in damaged)
    md, csv = out / "robustness.md", out / "robustness.csv"
    atomic_write_text(md, f"## Robustness\n\n{view.to_markdown(index=False)}\n\n{note}\n")
    atomic_write_text(csv, table.to_csv(index=False))
    colors = label_colors(list(agg["label"]))
    datasets = list(dict.fromkeys(agg["dataset"]))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = [p for ds in datasets if ds in set(long["dataset"])
               for p in _save(robustness_figure(long, ds, list(agg["label"]), colors), out / "figures",
                              "robustness" if len(datasets) == 1 else f"robustness_{_slug(ds)}")]
    return [md, csv], [("Robustness", view, note)], figures
