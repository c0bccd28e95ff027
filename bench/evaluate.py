"""Metrics of a trained method on a split: fused accuracy, macro-F1, mAP, per-modality accuracy,
and the method's own evaluation logs (`Prediction.logs`) averaged over the split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmbalance.core.types import Batch
from mmbalance.methods.base import Method


def average_precision(hits: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one binary problem, defined as scikit-learn's
    `average_precision_score` (sum over distinct thresholds of recall step x precision), without
    its per-call input validation, which dominated evaluation time on small splits."""
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(hits)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of one-vs-rest average precision; classes absent from `labels` are skipped
    (their AP is undefined)."""
    return float(np.mean([
        average_precision(labels == c, scores[:, c]) for c in range(scores.shape[1]) if (labels == c).any()
    ]))


def macro_f1(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all classes (0 for a class never predicted nor present),
    as scikit-learn's f1_score(average='macro', labels=range(C), zero_division=0)."""
    confusion = np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(float)
    denom = confusion.sum(axis=0) + confusion.sum(axis=1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return float(f1.mean())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = logits.float()
    y = labels.numpy()
    pred = logits.argmax(dim=1).numpy()
    probs = F.softmax(logits, dim=1).numpy()
    return {
        "acc": float((pred == y).mean()),
        "macro_f1": macro_f1(y, pred, logits.shape[1]),
        "map": mean_average_precision(y, probs),
        "loss": float(F.cross_entropy(logits, labels)),
    }


@dataclass
class Evaluation:
    """A split's metrics (fused, and `modality_acc`), and the method's logs averaged over it."""

    metrics: dict[str, Any]
    logs: dict[str, float]


class LogMeans:
    """Each key of `Prediction.logs` averaged over the batches that give it, weighted by their
    sizes: the mean over samples (for a per-sample quantity, exactly its mean over the split,
    whatever the eval batch size; unweighted, a short last batch would count as a full one).
    Sums stay on the device until `means()`."""

    def __init__(self, method: Method) -> None:
        self.method = type(method).__name__
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, torch.Tensor], n: int) -> None:
        for key, value in logs.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"{self.method}.predict: Prediction.logs[{key!r}] is {shape}; each log is "
                                "one number per batch, a 0-dim tensor (e.g. a mean over the batch)")
            self.sums[key] = self.sums.get(key, 0) + value.detach().float().reshape(()) * n
            self.counts[key] = self.counts.get(key, 0) + n

    def means(self) -> dict[str, float]:
        return {key: float(total) / self.counts[key] for key, total in self.sums.items()}


@torch.no_grad()
def evaluate(method: Method, batches: Iterable[Batch], autocast) -> Evaluation:
    """Fused metrics plus `modality_acc` from the method's own per-modality logits, and the
    method's logs, over `batches` (on the method's device)."""
    was_training = method.training
    method.eval()
    fused, per_modality, labels = [], {}, []
    logs = LogMeans(method)
    for batch in batches:
        with autocast():
            pred = method.predict(batch)
        fused.append(pred.fused.float().cpu())
        labels.append(batch.labels.cpu())
        for m, logits in (pred.per_modality or {}).items():
            per_modality.setdefault(m, []).append(logits.float().cpu())
        logs.add(pred.logs, len(batch))
    method.train(was_training)
    y = torch.cat(labels)
    result = classification_metrics(torch.cat(fused), y)
    result["modality_acc"] = {
        m: float((torch.cat(chunks).argmax(dim=1) == y).float().mean()) for m, chunks in per_modality.items()
    }
    return Evaluation(result, logs.means())
