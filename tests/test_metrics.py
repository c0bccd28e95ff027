"""Evaluation metrics against scikit-learn and by hand, and the frozen-encoder linear probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score

from mmbalance.bench.evaluate import average_precision, classification_metrics, macro_f1, mean_average_precision
from mmbalance.bench.probe import fit_probe

# ------------------------------------------------------------------------------ AP / mAP / F1


def test_average_precision_tiny_by_hand():
    hits = np.array([1, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # hits at ranks 1 and 3: precision 1 and 2/3 at the two recall steps of 1/2
    assert average_precision(hits, scores) == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    # the order of the input does not matter, only the scores
    perm = np.array([3, 1, 0, 2])
    assert average_precision(hits[perm], scores[perm]) == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)


def test_average_precision_ties_by_hand():
    # all four tied: one threshold, precision 2/4 at recall 1
    assert average_precision(np.array([1, 0, 1, 0], dtype=bool), np.full(4, 0.5)) == pytest.approx(0.5)
    # [0.9] hit, then {0.5, 0.5} one hit one miss, then 0.1 miss:
    # recall 1/2 at precision 1, recall 1 at precision 2/3
    hits = np.array([0, 1, 1, 0], dtype=bool)
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert average_precision(hits, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)
    # a perfect ranking
    assert average_precision(np.array([1, 1, 0], dtype=bool), np.array([3.0, 2.0, 1.0])) == 1.0


def test_mean_average_precision_and_macro_f1_tiny_by_hand():
    labels = np.array([0, 0, 1, 2])
    scores = np.array([
        [0.9, 0.05, 0.05],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.3, 0.3, 0.4],
    ])
    # class 0: hits [1,1,0,0] scores [.9,.2,.1,.3] -> ranks 1 and 3 -> (1 + 2/3)/2
    # class 1: hit at row 2 (0.8, top) -> 1;  class 2: hit at row 3 (0.4, top) -> 1
    assert mean_average_precision(labels, scores) == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)
    pred = scores.argmax(axis=1)  # [0, 1, 1, 2]
    # F1: class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn0 -> 2/3; class 2: 1; class 3 (absent) -> 0
    assert macro_f1(labels, pred, 3) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert macro_f1(labels, pred, 4) == pytest.approx((2 / 3 + 2 / 3 + 1 + 0) / 4)


def test_mean_average_precision_skips_absent_classes():
    labels = np.array([0, 0, 2, 2])
    scores = np.array([[0.9, 0.0, 0.1], [0.8, 0.1, 0.1], [0.1, 0.9, 0.0], [0.2, 0.1, 0.7]])
    # class 0: perfect -> 1; class 2: hits at scores .0 and .7 of [.1,.1,.0,.7] -> ranks 1 and 4 -> (1 + 2/4)/2
    assert mean_average_precision(labels, scores) == pytest.approx((1 + (1 + 0.5) / 2) / 2)


def random_problem(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 7))
    n = int(rng.integers(5, 60))
    present = rng.choice(num_classes, size=max(1, num_classes - int(rng.integers(0, 3))), replace=False)
    labels = rng.choice(present, size=n)
    scores = rng.random((n, num_classes))
    if seed % 2 == 0:  # heavy ties
        scores = np.round(scores, 1)
    if seed % 5 == 0:  # extreme ties: three distinct values only
        scores = rng.integers(0, 3, size=(n, num_classes)).astype(float)
    return labels, scores, num_classes


@pytest.mark.parametrize("seed", range(20))
def test_ap_map_f1_match_sklearn(seed):
    labels, scores, num_classes = random_problem(seed)
    present = [c for c in range(num_classes) if (labels == c).any()]
    for c in present:
        expected = average_precision_score(labels == c, scores[:, c])
        assert average_precision(labels == c, scores[:, c]) == pytest.approx(expected, abs=1e-12), c
    expected_map = np.mean([average_precision_score(labels == c, scores[:, c]) for c in present])
    assert mean_average_precision(labels, scores) == pytest.approx(expected_map, abs=1e-12)
    rng = np.random.default_rng(1000 + seed)
    for pred in (scores.argmax(axis=1), rng.integers(0, num_classes, size=len(labels)), labels):
        expected_f1 = f1_score(labels, pred, average="macro", labels=range(num_classes), zero_division=0)
        assert macro_f1(labels, pred, num_classes) == pytest.approx(expected_f1, abs=1e-12)


def test_random_problems_cover_ties_and_absent_classes():
    """The 20 problems above really exercise ties and classes missing from the labels."""
    absent = ties = 0
    for seed in range(20):
        labels, scores, num_classes = random_problem(seed)
        absent += len(set(range(num_classes)) - set(labels.tolist())) > 0
        ties += any(len(np.unique(scores[:, c])) < len(labels) for c in range(num_classes))
    assert absent >= 5 and ties >= 10


# ------------------------------------------------------------------------- classification_metrics


def test_classification_metrics_by_hand():
    logits = torch.tensor([
        [2.0, 0.0, 0.0],
        [0.0, 1.0, 0.5],
        [0.0, 3.0, 0.0],
        [1.0, 0.0, 0.2],
    ])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels)
    # predictions [0, 1, 1, 0]: rows 0 and 1 right
    assert m["acc"] == 0.5
    expected_loss = F.cross_entropy(logits, labels).item()
    by_hand = -np.mean([
        2 - math.log(math.exp(2) + 2),
        1 - math.log(1 + math.e + math.exp(0.5)),
        0 - math.log(2 + math.exp(3)),
        0.2 - math.log(math.e + 1 + math.exp(0.2)),
    ])
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["loss"] == pytest.approx(by_hand, rel=1e-6)
    # F1: class 0 tp1 fp1 fn0 -> 2/3; class 1 tp1 fp1 fn0 -> 2/3; class 2 tp0 fn2 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    probs = F.softmax(logits, dim=1).numpy()
    expected_map = np.mean([average_precision_score(labels.numpy() == c, probs[:, c]) for c in range(3)])
    assert m["map"] == pytest.approx(expected_map, abs=1e-9)
    assert set(m) == {"acc", "macro_f1", "map", "loss"}
    # bf16 logits are evaluated in float32
    assert classification_metrics(logits.bfloat16(), labels)["acc"] == 0.5


# -------------------------------------------------------------------------------------- probe


def clusters(n: int, rng: np.random.Generator, spread: float) -> tuple[np.ndarray, np.ndarray]:
    centers = np.array([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0]])
    y = np.arange(n) % 3
    return centers[y] * spread + rng.standard_normal((n, 4)), y


def test_probe_separable_features():
    rng = np.random.default_rng(0)
    train, val, test = (clusters(n, rng, 1.0) for n in (150, 60, 60))
    grid = [10.0, 0.1, 1.0]
    result = fit_probe(train, val, test, grid, max_iter=200)
    assert result["test_acc"] >= 0.99
    assert result["train_acc"] >= 0.99 and result["val_acc"] >= 0.99
    assert result["C"] in grid
    # every C separates these clusters perfectly, so the smallest C wins the tie
    assert result["C"] == 0.1
    assert set(result) == {"train_acc", "val_acc", "test_acc", "C"}


def test_probe_noise_is_near_chance():
    rng = np.random.default_rng(1)

    def noise(n):
        return rng.standard_normal((n, 10)), np.arange(n) % 2

    grid = [0.01, 1.0, 100.0]
    result = fit_probe(noise(200), noise(100), noise(200), grid, max_iter=200)
    assert result["test_acc"] < 0.6
    assert result["test_acc"] > 0.4
    assert result["C"] in grid


def test_probe_picks_best_val_c():
    """C is chosen on val accuracy alone, even where test accuracy would prefer the other C."""
    rng = np.random.default_rng(2)
    # overlapping clusters: the two C give different val and test accuracies
    train, val, test = (clusters(n, rng, 0.15) for n in (150, 60, 60))
    grid = [1e-4, 1.0]
    result = fit_probe(train, val, test, grid, max_iter=200)
    single = {c: fit_probe(train, val, test, [c], max_iter=200) for c in grid}
    best_val = max(r["val_acc"] for r in single.values())
    chosen = min(c for c, r in single.items() if r["val_acc"] == best_val)
    assert result["C"] == chosen
    # with this seed val prefers one C and test the other, so the choice cannot be test-driven
    other = next(c for c in grid if c != chosen)
    assert single[chosen]["val_acc"] > single[other]["val_acc"]
    assert single[chosen]["test_acc"] < single[other]["test_acc"]
    assert result["val_acc"] == best_val
    assert result["test_acc"] == pytest.approx(single[chosen]["test_acc"], abs=1 / 60 + 1e-9)
