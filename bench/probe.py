"""Frozen-encoder linear probes: how much each modality's encoder learned, whatever the head did.

Features come from the train split without augmentation; a multinomial logistic regression on
standardised features is fit for each C of the grid, C is chosen on val, and test accuracy at
that C is the reported number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mmbalance.core.types import Batch
from mmbalance.methods.base import Method


@torch.no_grad()
def collect_features(method: Method, batches: Iterable[Batch], autocast) -> tuple[dict[str, np.ndarray], np.ndarray]:
    method.eval()
    feats: dict[str, list[np.ndarray]] = {}
    labels = []
    for batch in batches:
        with autocast():
            out = method.features(batch)
        for m, f in out.items():
            feats.setdefault(m, []).append(f.float().flatten(1).cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
    return {m: np.concatenate(chunks) for m, chunks in feats.items()}, np.concatenate(labels)


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    c_grid: Sequence[float],
    max_iter: int = 500,
) -> dict[str, float]:
    """Fit one probe per C on `train`, choose C on `val` (the smallest best C wins), report on `test`."""
    # scikit-learn adds ~1.2 s of CPU to an import of torch: only a run's probes need it, not
    # every command that imports the training module
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(train[0])
    xs = {name: scaler.transform(x) for name, (x, _) in {"train": train, "val": val, "test": test}.items()}
    best: dict[str, float] | None = None
    # ascending C with warm starts: each fit starts from the last (stronger-regularised) optimum
    clf = LogisticRegression(max_iter=max_iter, warm_start=True)
    for c in sorted(c_grid):
        # multi-threaded BLAS on these small problems ran ~18x slower than one thread on 2 cores
        with threadpool_limits(limits=1, user_api="blas"):
            clf.set_params(C=c).fit(xs["train"], train[1])
        scores = {f"{name}_acc": float(clf.score(xs[name], y))
                  for name, y in (("train", train[1]), ("val", val[1]), ("test", test[1]))}
        if best is None or scores["val_acc"] > best["val_acc"]:
            best = {**scores, "C": float(c)}
    assert best is not None, "c_grid is empty"
    return best


def probe_all(
    method: Method,
    batches: dict[str, Iterable[Batch]],
    autocast,
    c_grid: Sequence[float],
    max_iter: int,
) -> dict[str, dict[str, float]]:
    """modality -> probe result, for every modality `method.features` returns; `batches` holds
    an un-augmented pass over each of train, val and test."""
    data = {name: collect_features(method, passes, autocast) for name, passes in batches.items()}
    return {
        m: fit_probe(*((data[s][0][m], data[s][1]) for s in ("train", "val", "test")), c_grid, max_iter)
        for m in data["train"][0]
    }
