"""Every run under a results directory as one flat row, finished or not, for the report.

Unlike `table.run_rows` (finished runs of one group), this keeps failed, interrupted and
unfinished runs so the report can show them, and picks the epoch by a named selection rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import ConfigError
from bench.store import RunDir

# --select value -> the summary.json block it reads, and how the report names it
SELECTIONS = {
    "val": ("best_val", "test split at the best-validation epoch"),
    "test": ("best_test", "test split at the best-test epoch (the papers' protocol; optimistic)"),
    "last": ("last", "test split at the last epoch"),
}


def run_dirs(results_dir: Path) -> list[RunDir]:
    """The run directories of a group directory (`<root>/<group>`) or of a whole store root."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"results directory {results_dir} does not exist; give a group directory "
                          f"(results/<group>) or the store root (results)")
    configs = sorted(results_dir.glob("*/config.yaml")) or sorted(results_dir.glob("*/*/config.yaml"))
    return [RunDir(c.parent) for c in configs]


def load_runs(results_dir: Path, select: str = "val",
              only: set[str] | None = None) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """(one row per run, per-epoch metrics by run id) for every run under `results_dir`, or for
    those of its runs whose id is in `only`."""
    if select not in SELECTIONS:
        raise ConfigError(f"--select {select!r} is not allowed; choose one of {', '.join(SELECTIONS)}")
    rows, metrics = [], {}
    for rd in run_dirs(results_dir):
        if only is not None and rd.run_id not in only:
            continue
        rows.append(run_row(rd, SELECTIONS[select][0]))
        metrics[rd.run_id] = rd.read_metrics()
    return pd.DataFrame(rows), metrics


def run_row(rd: RunDir, block: str) -> dict[str, Any]:
    """Config identity, state and (for a finished run) the selected metrics and cost of one run."""
    cfg = rd.read_config()
    method = cfg["method"]["name"]
    row: dict[str, Any] = {
        "group": rd.path.parent.name,
        "run_id": rd.run_id,
        "dataset": cfg["dataset"]["name"],
        "dataset_config": json.dumps(cfg["dataset"], sort_keys=True),  # tells presets of one dataset apart
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
    row.update({"acc": test["acc"], "macro_f1": test["macro_f1"], "map": test["map"],
                "epoch": summary[block]["epoch"], "acc_best_test": summary["best_test"]["test"]["acc"]})
    for m, acc in test.get("modality_acc", {}).items():
        row[f"own.{m}"] = acc
    for m, probe in summary.get("probes", {}).items():
        row[f"probe.{m}"] = probe["test_acc"]
    row.update(cost_columns(summary.get("cost", {}), summary.get("epochs")))
    return row


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
