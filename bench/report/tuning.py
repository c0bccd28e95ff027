"""The report's Tuning section, for a group tuned with `mmbalance tune` (bench.tune): a table
tuning.{md,csv} of tuned vs default per cell (fused test accuracy at the best-val epoch, mean ± std
over seeds from the one aggregation, `cells.aggregate`), the chosen parameters and the trials
spent, and a figure of the search curves (best validation value so far vs trial, one line per
cell). It reads the studies' records `tuning/<cell>.json` (the report imports no Optuna); nothing
is written when the group has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmbalance.bench.report.cells import aggregate, fmt
from mmbalance.bench.store import atomic_write_text

TUNING = "tuning"  # bench.tune.tuning_dir's folder name in the group
NOTE = ("Equal-budget tuning (`mmbalance tune`): each cell's Optuna study (seeded TPE, median pruning on "
        "validation accuracy per epoch) spends the same number of trials on the first seed, choosing on "
        "validation only; the chosen parameters are then run over every seed as `<cell>-tuned`. Fused test "
        "accuracy at the best-validation epoch, mean ± std over seeds (n). Trials: completed / pruned / failed.")


def read_records(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(results_dir) / TUNING).glob("*.json"))]


def tuning_table(records: list[dict], runs: pd.DataFrame) -> pd.DataFrame:
    """One row per tuned cell and dataset: default and tuned accuracy, the chosen parameters."""
    labels = [lab for r in records for lab in (r["label"], r["tuned_label"])]
    agg = aggregate(runs[runs["label"].isin(labels)], labels)
    acc: dict[tuple[str, str], tuple[str, float]] = {}
    for _, row in agg.iterrows():
        acc[(row["dataset"], row["label"])] = (fmt(row["acc:mean"], row["acc:std"], row["acc:n"], row["n"]),
                                               row["acc:mean"])
    shown = dict(zip(runs["dataset_config"], runs["dataset"]))  # a study's dataset as the tables name it
    rows = []
    for r in records:
        states = [t["state"] for t in r["trials"]]
        mine = [shown[r["dataset_config"]]] if r.get("dataset_config") in shown else list(dict.fromkeys(agg["dataset"]))
        for ds in mine:
            default, tuned = acc.get((ds, r["label"]), ("–", np.nan)), acc.get((ds, r["tuned_label"]), ("–", np.nan))
            rows.append({"dataset": ds, "label": r["label"], "method": r["method"], "default acc": default[0],
                         "tuned acc": tuned[0], "gain": tuned[1] - default[1],
                         "chosen": ", ".join(f"{k}={v:.4g}" for k, v in r["chosen"].items()),
                         "best val": r["chosen_value"],
                         "trials": f"{states.count('COMPLETE')}/{states.count('PRUNED')}/{states.count('FAIL')}"})
    return pd.DataFrame(rows)


def search_curves(records: list[dict]):
    """Best validation value so far vs trial number, one line per cell (pruned trials carry it on)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for r in records:
        values = [t["value"] if t["state"] == "COMPLETE" else np.nan for t in r["trials"]]
        best = pd.Series(values, dtype=float).cummax().ffill()
        ax.plot(np.arange(1, len(best) + 1), best, marker="o", markersize=3, label=r["label"])
    ax.set(xlabel="trial", ylabel=f"best {records[0]['metric']} so far", title="tuning: search curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_tuning(results_dir: Path, runs: pd.DataFrame,
                 out: Path) -> tuple[list[Path], list[tuple[str, pd.DataFrame, str]], list[Path]]:
    """(table files, report sections, figure files) of the group's studies; all empty without any."""
    from mmbalance.bench.report.figures import _save

    records = read_records(results_dir)
    if not records:
        return [], [], []
    table = tuning_table(records, runs)
    md, csv = out / "tuning.md", out / "tuning.csv"
    atomic_write_text(md, f"## Tuning\n\n{table.to_markdown(index=False, floatfmt='.3f')}\n\n{NOTE}\n")
    atomic_write_text(csv, table.to_csv(index=False))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = _save(search_curves(records), out / "figures", "tuning_search")
    return [md, csv], [("Tuning", table, NOTE)], figures
