"""The modality contributions in the report (bench.contribution: exact Shapley values of each
modality to the fused accuracy, and the imbalance degree derived from them).

Table columns (`shapley.<m>`, `imbalance`, through cells.aggregate like every metric): the test
split at the selected (best-validation) epoch, from summary.json's `contribution`. Only that
epoch's are computed on test, so the other selections (--select test/last) leave them empty.
Figure: each epoch's validation Shapley values per modality (metrics.jsonl's `contribution`), one
colour per method as in the other figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the figure's imports (matplotlib, seaborn) stay out of the table's start-up
    import pandas as pd
    from matplotlib.figure import Figure

NOTE = ("shapley <m> = m's Shapley value to the fused test accuracy at the selected epoch, with absent "
        "modalities' inputs zeroed (BalanceBenchmark's Calculate_Shapley); they sum to v(all) − v(none); "
        "imbalance degree = (max − min) / Σ|φ|, 0 = every modality contributes equally")


def contribution_columns(summary: dict[str, Any], block: str) -> dict[str, float]:
    """shapley.<m> and imbalance of a finished run's summary, for the best-val selection only."""
    test = (summary.get("contribution") or {}).get("test")
    if block != "best_val" or not test:
        return {}
    return {**{f"shapley.{m}": v for m, v in test["shapley"].items()}, "imbalance": test["imbalance_degree"]}


def _val_shapley(record: dict) -> dict[tuple[str, str], Any]:
    shap = (record.get("contribution") or {}).get("shapley") or {}
    return {(f"val Shapley: {m}", ""): v for m, v in shap.items()}


def contribution_trajectories(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]],
                              colors: dict[str, Any], ds: str) -> Figure | None:
    """Per-epoch validation Shapley value of each modality (one panel each), one line per method
    (mean over seeds, band = 95% t-CI); None when no run of `ds` recorded contributions."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    from mmbalance.bench.report.figures import _label_legend, _long, _rows
    from mmbalance.bench.report.stats import ci_bounds

    data = _long(metrics, runs[runs["dataset"] == ds], _val_shapley)
    if data.empty:
        return None
    labels = [name for name in _rows(agg, ds) if name in set(data["label"])]
    grid = sns.relplot(data=data, x="epoch", y="value", col="panel", col_order=sorted(data["panel"].unique()),
                       hue="label", hue_order=labels, palette=colors, kind="line", errorbar=ci_bounds,
                       marker=".", height=3.4, aspect=1.2, legend=False)
    grid.set_titles("{col_name}").set_axis_labels("epoch", "Shapley value (val accuracy)")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    grid.figure.suptitle(f"{ds}: each modality's contribution to the fused prediction per epoch "
                         "(mean over seeds, band = 95% t-CI)", fontsize=10)
    grid.figure.tight_layout()
    _label_legend(grid.figure, labels, colors)
    return grid.figure


def contribution_figures(agg: pd.DataFrame, runs: pd.DataFrame, metrics: dict[str, list[dict]],
                         colors: dict[str, Any], slug) -> dict[str, Figure]:
    """{file stem: figure} per dataset with contributions recorded (named as figures.draw_figures does)."""
    datasets = list(dict.fromkeys(agg["dataset"]))
    figures = {f"contribution{'' if len(datasets) == 1 else '_' + slug(ds)}":
               contribution_trajectories(agg, runs, metrics, colors, ds) for ds in datasets}
    return {stem: fig for stem, fig in figures.items() if fig is not None}
