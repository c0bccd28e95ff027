"""The one model-selection rule of the suite.

The reported epoch of a run is the first epoch with the highest validation `eval.select_metric`
among the epochs its method marks selectable (DI-MML: stage 2 only). The trainer (what `best.pt`
holds and `summary.json` reports), `mmbalance status` and the CLI all call `best_epoch`, so they
cannot disagree. Epochs are numbered from 0 everywhere (metrics.jsonl, summary.json, status, CLI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def best_epoch(history: Sequence[dict[str, Any]], metric: str, split: str = "val") -> dict[str, Any] | None:
    """The record of the selected epoch of `history` (metrics.jsonl records), or None when no
    epoch is selectable yet. `split="test"` gives the papers' best-on-test epoch by the same rule."""
    candidates = [r for r in history if r.get("selectable", True)]
    # max keeps the first of equal values: the earliest epoch wins a tie
    return max(candidates, key=lambda r: r[split][metric], default=None)


def select_metric(config: dict[str, Any]) -> str:
    """The selection metric of a resolved run config (as stored in config.yaml)."""
    return (config.get("eval") or {}).get("select_metric", "acc")
