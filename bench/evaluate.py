"""Metrics of a trained method on a split: fused accuracy, macro-F1, mAP, per-modality accuracy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score

from bench.data import batches
from methods.base import Method


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of one-vs-rest average precision; classes absent from `labels` are skipped
    (their AP is undefined)."""
    aps = [
        average_precision_score(labels == c, scores[:, c])
        for c in range(scores.shape[1])
        if (labels == c).any()
    ]
    return float(np.mean(aps))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = logits.float()
    y = labels.numpy()
    pred = logits.argmax(dim=1).numpy()
    probs = F.softmax(logits, dim=1).numpy()
    return {
        "acc": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=np.arange(logits.shape[1]), zero_division=0)),
        "map": mean_average_precision(y, probs),
        "loss": float(F.cross_entropy(logits, labels)),
    }


@torch.no_grad()
def evaluate(
    method: Method,
    split: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    autocast,
) -> dict:
    """Fused metrics plus `modality_acc` from the method's own per-modality logits."""
    was_training = method.training
    method.eval()
    fused, per_modality, labels = [], {}, []
    for batch in batches(split, batch_size, shuffle=False):
        batch = batch.to(device)
        with autocast():
            pred = method.predict(batch)
        fused.append(pred.fused.float().cpu())
        labels.append(batch.labels.cpu())
        for m, logits in (pred.per_modality or {}).items():
            per_modality.setdefault(m, []).append(logits.float().cpu())
    method.train(was_training)
    y = torch.cat(labels)
    result = classification_metrics(torch.cat(fused), y)
    result["modality_acc"] = {
        m: float((torch.cat(chunks).argmax(dim=1) == y).float().mean()) for m, chunks in per_modality.items()
    }
    return result
