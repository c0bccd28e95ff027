"""Readable names of dataset configs, unique per config: what the report's tables call a dataset
and what `mmbalance tune` names a cell's study after (a label on several datasets)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# dataset config keys that name a variant of the data: always part of the readable label
VARIANT_KEYS = ("preset", "pipeline", "root")


def dataset_key(dataset: dict[str, Any]) -> str:
    """A dataset config as one string (JSON, keys sorted): how the report's rows and a tuning
    study's record name the same dataset config."""
    return json.dumps(dataset, sort_keys=True)


def dataset_labels(configs: Iterable[str]) -> dict[str, str]:
    """A readable label per dataset config (JSON), unique per config: the name with its preset,
    pipeline and root when set; configs that would still share a label add the keys they differ in."""
    parsed = {c: json.loads(c) for c in dict.fromkeys(configs)}
    labels = {c: _label(d, [k for k in VARIANT_KEYS if d.get(k) is not None]) for c, d in parsed.items()}
    for label in set(labels.values()):
        same = [c for c in labels if labels[c] == label]
        if len(same) > 1:
            keys = sorted({k for c in same for k in parsed[c]} - {"name", *VARIANT_KEYS})
            differ = [k for k in keys if len({json.dumps(parsed[c].get(k)) for c in same}) > 1]
            for c in same:
                labels[c] = _label(parsed[c], [k for k in VARIANT_KEYS if parsed[c].get(k) is not None] + differ)
    return labels


def _label(cfg: dict[str, Any], keys: list[str]) -> str:
    parts = ", ".join(f"{k}={cfg.get(k)}" for k in keys)
    return f"{cfg['name']} ({parts})" if parts else str(cfg["name"])
