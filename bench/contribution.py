"""Each modality's contribution to the fused prediction: exact Shapley values over modality
subsets, and the imbalance degree derived from them.

The value of a coalition S of modalities is v(S) = the accuracy of the method's fused prediction
with only the modalities of S present (`Method.predict_masked`). Absent is, by `eval.contribution_mask`:
- "features" (the default): the modality's features, its encoder's output, are zeros where the
  method fuses them: the modality contributes nothing to the fusion (what the issue asks);
- "input": its input is replaced by zeros and still passed through its encoder, as
  BalanceBenchmark's `Calculate_Shapley` does (balancemm/evaluation/modalitys.py, through its
  models' `padding`): an encoder's biases still put out something for a zero input.
v(∅) is the accuracy with every modality absent (not 0), and

    φ_m = Σ_{S ⊆ M∖{m}} |S|! (M − |S| − 1)! / M! · [v(S ∪ {m}) − v(S)],

so that Σ_m φ_m = v(M) − v(∅) (efficiency). Exact: 2^M coalitions, computed for M ≤ 4 only
(MAX_MODALITIES); BalanceBenchmark runs it once, on test, for the final model; we run it on the
validation split every epoch and on test for the selected epoch.

Imbalance degree: BalanceBenchmark names "imbalance degree" as one of its three evaluation
perspectives, but its code computes no such scalar (`train.py` has only a commented-out
`print(f'The imbalance is :{imbalance}')`), and the paper's definition could not be read. Ours,
from the Shapley values: (max_m φ_m − min_m φ_m) / Σ_m |φ_m|, in [0, 1]: 0 when every modality
contributes equally, 1 when one modality carries everything (for M = 2: |φ_a − φ_v| / (φ_a + φ_v)
when both are positive); NaN when no modality contributes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from itertools import combinations
from math import factorial
from typing import Any

import torch

from mmbalance.core.types import Batch
from mmbalance.methods.base import Method

MAX_MODALITIES = 4  # 2^M coalitions each an evaluation pass: exact Shapley only up to here
EMPTY = "∅"  # the name of the empty coalition in the records


def coalitions(players: Iterable[str]) -> list[frozenset[str]]:
    """Every subset of `players`, the empty one first, by size."""
    names = sorted(players)
    return [frozenset(c) for r in range(len(names) + 1) for c in combinations(names, r)]


def coalition_name(coalition: frozenset[str]) -> str:
    return "+".join(sorted(coalition)) or EMPTY


def shapley(values: dict[frozenset[str], float], players: Iterable[str]) -> dict[str, float]:
    """Exact Shapley value of each player of the game `values` (every coalition of `players`)."""
    names = sorted(players)
    n = len(names)
    phi = {}
    for m in names:
        others = [p for p in names if p != m]
        phi[m] = sum(factorial(len(s)) * factorial(n - len(s) - 1) / factorial(n)
                     * (values[frozenset(s) | {m}] - values[frozenset(s)])
                     for r in range(n) for s in combinations(others, r))
    return phi


def imbalance_degree(phi: dict[str, float]) -> float:
    """(max φ − min φ) / Σ|φ| (see the module docstring); NaN when every φ is 0, and for a model
    of one modality (a unimodal reference): with one player there is no balance to measure."""
    total = sum(abs(v) for v in phi.values())
    return (max(phi.values()) - min(phi.values())) / total if total > 0 and len(phi) > 1 else float("nan")


@torch.no_grad()
def coalition_accuracies(method: Method, batches: Iterable[Batch], autocast: Callable[[], AbstractContextManager],
                         mask: str = "features") -> dict[frozenset[str], float]:
    """v(S) for every coalition S of the method's modalities: the fused accuracy of
    `method.predict_masked(batch, S, mask)` over `batches`, in eval mode (restored after)."""
    was_training = method.training
    method.eval()
    subsets = coalitions(method.modality_names)
    correct = dict.fromkeys(subsets, 0)
    total = 0
    for batch in batches:
        for s in subsets:
            with autocast():
                fused = method.predict_masked(batch, s, mask).fused
            correct[s] += int((fused.argmax(dim=1) == batch.labels).sum())
        total += len(batch)
    method.train(was_training)
    return {s: c / total for s, c in correct.items()}


def contribution(method: Method, batches: Callable[[], Iterable[Batch]],
                 autocast: Callable[[], AbstractContextManager], mask: str = "features") -> dict[str, Any] | None:
    """{"shapley": {m: φ_m}, "imbalance_degree": x, "coalitions": {name: v(S)}, "mask": mask} over
    the pass `batches()`, or None for a method of more than MAX_MODALITIES modalities (not computed)."""
    if len(method.modality_names) > MAX_MODALITIES:
        return None
    values = coalition_accuracies(method, batches(), autocast, mask)
    phi = shapley(values, method.modality_names)
    return {"shapley": phi, "imbalance_degree": imbalance_degree(phi),
            "coalitions": {coalition_name(s): v for s, v in values.items()}, "mask": mask}
