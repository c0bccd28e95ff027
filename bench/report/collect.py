"""Every run under a results directory as one flat row, finished or not: the report's only
reader of the store. Everything the report writes is a view of these rows (and of
`bench.report.cells.aggregate` over them).

A dataset's identity is its full config (name, preset, pipeline, root, every parameter), so two
presets of one dataset are two datasets everywhere: in the table's blocks, the unimodal
reference and the paired tests. `dataset` is a readable label unique per config
(`avdigits (preset=audio-dominant)`), `dataset_name` the registry name, `dataset_config` the JSON.

Each run's probe deficit is computed here, per seed: deficit.<m> = probe accuracy on m of the
unimodal-only model of m (same dataset, same seed) − this run's probe accuracy on m. Probe vs
probe, same protocol: a unimodal run's deficit against itself is exactly 0. A seed without a
unimodal-only run of m has no deficit (NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mmbalance.bench.naming import dataset_key, dataset_labels
from mmbalance.bench.report.contribution import contribution_columns
from mmbalance.bench.store import RunDir, run_dirs
from mmbalance.core.errors import ConfigError

# --select value -> the summary.json block it reads, and how the report names it
SELECTIONS = {
    "val": ("best_val", "test split at the best-validation epoch"),
    "test": ("best_test", "test split at the best-test epoch (the papers' protocol; optimistic)"),
    "last": ("last", "test split at the last epoch"),
}
DEFICIT_NOTE = ("probe deficit <m> = probe accuracy on m of the unimodal-only model of m (same dataset, "
                "same seed) − this run's probe accuracy on m; positive: the encoder of m learned less "
                "inside this model than alone; 0 for the unimodal-only model itself; seeds without a "
                "unimodal-only run of m are left out of it (its n is then given)")


def load_runs(results_dir: Path, select: str = "val",
              only: set[str] | None = None) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """(one row per run, per-epoch metrics by run id) for every run under `results_dir`, or for
    those of its runs whose id is in `only`; rows carry their dataset label and probe deficits."""
    if select not in SELECTIONS:
        raise ConfigError(f"--select {select!r} is not allowed; choose one of {', '.join(SELECTIONS)}")
    rows, metrics = [], {}
    for rd in run_dirs(results_dir):
        if only is not None and rd.run_id not in only or rd.damage():  # damaged: left out (damaged_runs)
            continue
        rows.append(run_row(rd, SELECTIONS[select][0]))
        metrics[rd.run_id] = rd.read_metrics()
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs, metrics
    runs["dataset"] = runs["dataset_config"].map(dataset_labels(runs["dataset_config"]))
    return add_deficits(runs), metrics


def damaged_runs(results_dir: Path, only: set[str] | None = None) -> pd.DataFrame:
    """The runs load_runs leaves out because a record of theirs is damaged: group, run id, the
    file and why (one row per damaged file)."""
    rows = [{"group": rd.path.parent.name, "run_id": rd.run_id, "file": e.path.name, "why": e.why}
            for rd in run_dirs(results_dir) if only is None or rd.run_id in only for e in rd.damaged()]
    return pd.DataFrame(rows, columns=["group", "run_id", "file", "why"])


def run_row(rd: RunDir, block: str) -> dict[str, Any]:
    """Config identity, state and (for a finished run) the selected metrics and cost of one run."""
    cfg = rd.read_config()
    method = cfg["method"]["name"]
    row: dict[str, Any] = {
        "group": rd.path.parent.name,
        "run_id": rd.run_id,
        "dataset_name": cfg["dataset"]["name"],
        "dataset_config": dataset_key(cfg["dataset"]),
        "label": cfg.get("label") or method,
        "method": method,
        "fusion": (cfg.get("model") or {}).get("fusion"),
        "unimodal_modality": cfg["method"].get("modality") if method == "unimodal" else None,
        "seed": cfg["train"]["seed"],
        "state": rd.status().get("state", "new"),
    }
    summary = rd.read_summary()
    if row["state"] != "finished" or summary is None:
        return row
    test = summary[block]["test"]
    row["family"] = summary.get("method_family")  # absent from runs made before methods had one
    row.update({"acc": test["acc"], "macro_f1": test["macro_f1"], "map": test["map"],
                "epoch": summary[block]["epoch"], "acc_best_test": summary["best_test"]["test"]["acc"]})
    for m, acc in test.get("modality_acc", {}).items():
        row[f"own.{m}"] = acc
    for m, probe in summary.get("probes", {}).items():
        row[f"probe.{m}"] = probe["test_acc"]
    row.update(contribution_columns(summary, block))
    row.update(cost_columns(summary.get("cost", {}), summary.get("epochs")))
    return row


def add_deficits(runs: pd.DataFrame) -> pd.DataFrame:
    """deficit.<m> per run: the probe on m of the unimodal-only model of m with the same dataset and
    seed (the mean, should a store hold several) minus this run's probe on m; NaN without one."""
    runs = runs.copy()
    probes = [c for c in runs if c.startswith("probe.")]
    uni = runs[(runs["method"] == "unimodal") & (runs["state"] == "finished")]
    for col in probes:
        m = col.split(".", 1)[1]
        ref = uni[uni["unimodal_modality"] == m].groupby(["dataset", "seed"])[col].mean()
        key = pd.MultiIndex.from_frame(runs[["dataset", "seed"]])
        runs[f"deficit.{m}"] = ref.reindex(key).to_numpy() - runs[col].to_numpy()
    return runs


def cost_columns(cost: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """Cost of one run from summary['cost']: hours are seconds/epoch × epochs, on its device."""
    s = cost.get("seconds_per_epoch")
    gpu = str(cost.get("device", "cpu")).startswith("cuda")
    hours = s * epochs / 3600 if s is not None and epochs else None
    peak = cost.get("peak_gpu_mem_mb", cost.get("peak_rss_mb"))
    return {
        "s_per_epoch": s,
        "gpu_hours": hours if gpu else None,
        "cpu_hours": None if gpu else hours,
        "peak_mem_mb": peak,
        "fwd_per_step": cost.get("forward_passes_per_step"),
        "bwd_per_step": cost.get("backward_passes_per_step"),
    }
