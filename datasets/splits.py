"""Split manifests: the published split each dataset is checked against, and validation carving.

A dataset ships `datasets/manifests/<name>.json`, one entry per split *flavour* (e.g. CREMA-D's
OGM-GE and MLA splits)::

    {"flavours": {"ogmge": {
        "source": "GeWu-Lab/OGM-GE_CVPR2022 data/CREMAD/{train,test}.csv",
        "counts": {"train": 5954, "val": 744, "test": 744},
        "val": {"from": "train", "count": 744, "seed": 0},
        "lists": {"test": {"file": "lists/cremad_ogmge_test.csv", "sha256": "...",
                           "id_regex": "^([^,]+),"}}}}}

`counts` are the published sizes (after carving val); `lists` pin the exact ids of the splits
whose list could be vendored. A prepare compares what the raw download's split files give with
this, and records in the cache whether the split is the published one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from mmbalance.core.errors import DataError

MANIFEST_DIR = Path(str(resources.files("mmbalance.datasets") / "manifests"))


class ValCarving(BaseModel):
    """A validation split carved from train: a fixed number or fraction per class, by a seed."""

    count: int | None = None
    fraction: float | None = None
    seed: int = 0


class Flavour(BaseModel):
    source: str
    counts: dict[str, int] = Field(default_factory=dict)
    val: ValCarving | None = None
    lists: dict[str, dict[str, str]] = Field(default_factory=dict)  # split -> {file, sha256}


class SplitManifest(BaseModel):
    dataset: str
    flavours: dict[str, Flavour]

    def flavour(self, name: str) -> Flavour:
        if name not in self.flavours:
            raise DataError(f"dataset {self.dataset!r} has no split flavour {name!r}; allowed: {sorted(self.flavours)}")
        return self.flavours[name]


def load_manifest(dataset: str, directory: Path = MANIFEST_DIR) -> SplitManifest:
    path = directory / f"{dataset}.json"
    if not path.is_file():
        raise DataError(f"no split manifest for dataset {dataset!r} ({str(path)!r} is missing)")
    return SplitManifest.model_validate(json.loads(path.read_text()))


def list_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of a split's ids, order-free: sorted, one per line, newline-terminated."""
    return hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode()).hexdigest()


def carve_val(train_ids: Sequence[str], labels: Sequence[int], carving: ValCarving) -> tuple[list[str], list[str]]:
    """(train, val): a class-stratified draw from `train_ids` fixed by `carving.seed`.

    The draw depends only on the sorted ids and labels of the listed train split, never on which
    files happen to be present, so every user of the same list gets the same validation split.
    """
    order = sorted(range(len(train_ids)), key=lambda i: train_ids[i])
    ids = [train_ids[i] for i in order]
    ys = np.asarray([labels[i] for i in order])
    n = len(ids)
    total = carving.count if carving.count is not None else round((carving.fraction or 0.0) * n)
    if not 0 < total < n:
        raise DataError(f"validation carving of {total} from {n} train samples is impossible (val: {carving})")
    rng = np.random.default_rng(carving.seed)
    classes, sizes = np.unique(ys, return_counts=True)
    quota = _largest_remainder(sizes * total / n, total)
    val = set()
    for c, k in zip(classes, quota):
        members = np.flatnonzero(ys == c)
        val.update(int(i) for i in rng.choice(members, size=int(k), replace=False))
    return [ids[i] for i in range(n) if i not in val], [ids[i] for i in sorted(val)]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    base = np.floor(shares).astype(int)
    extra = total - base.sum()
    base[np.argsort(-(shares - base), kind="stable")[:extra]] += 1
    return base


def read_pinned_list(flavour: Flavour, split: str, directory: Path = MANIFEST_DIR) -> list[str] | None:
    """The ids of the vendored list of `split` (group 1 of the entry's `id_regex`), checked against
    its SHA-256; None if not pinned."""
    entry = flavour.lists.get(split)
    if entry is None:
        return None
    path = directory / entry["file"]
    text = path.read_bytes()
    if hashlib.sha256(text).hexdigest() != entry["sha256"]:
        raise DataError(f"vendored split list {str(path)!r} does not match its SHA-256 in the manifest")
    pattern = re.compile(entry.get("id_regex", r"^(\S+)"))
    ids = []
    for n, line in enumerate(text.decode().splitlines(), 1):
        if line.strip():
            match = pattern.search(line)
            if match is None:
                raise DataError(f"{str(path)!r} line {n}: no id matches {pattern.pattern!r}")
            ids.append(match.group(1))
    return ids


def compare_with_published(
    splits: dict[str, list[str]], flavour: Flavour, directory: Path = MANIFEST_DIR
) -> dict[str, Any]:
    """How the split lists read from the raw download compare with the published ones."""
    info: dict[str, Any] = {"source": flavour.source, "splits": {}}
    published = True
    for name, ids in splits.items():
        entry: dict[str, Any] = {"listed": len(ids), "sha256": list_sha256(ids)}
        expected = flavour.counts.get(name)
        if expected is not None:
            entry["published_count"] = expected
            published &= expected == len(ids)
        pinned = read_pinned_list(flavour, name, directory)
        if pinned is not None:
            # a list may name an id twice (AVE's valSet.txt: one video under two events); the
            # split holds it once
            entry["matches_pinned_list"] = sorted(set(pinned)) == sorted(ids)
            published &= entry["matches_pinned_list"]
        info["splits"][name] = entry
    # None: nothing was published to compare with (VGGSound, your own CSV)
    info["is_published_split"] = published if (flavour.counts or flavour.lists) else None
    return info
