"""Modality contributions (bench.contribution): exact Shapley values on hand-made games, the
values a run records against a hand computation from masked predictions (M = 2 and 3), the
imbalance degree, the report's table and figure, and the switch leaving run ids unchanged."""

from __future__ import annotations

import itertools
import json
import math

import pandas as pd
import pytest
import torch

from mmbalance.bench.contribution import coalitions, imbalance_degree, shapley
from mmbalance.bench.report.build import build_report
from mmbalance.bench.store import RunDir
from mmbalance.bench.train import build_checked, build_dataset, run
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch


def game(fn, players):
    return {s: fn(s) for s in coalitions(players)}


def test_shapley_of_an_additive_game_is_each_players_own_worth():
    worth = {"a": 0.3, "b": 0.1, "c": -0.05}
    values = game(lambda s: 0.2 + sum(worth[p] for p in s), worth)
    assert shapley(values, worth) == pytest.approx(worth)


def test_shapley_efficiency_symmetry_and_dummy():
    # a and b symmetric and complementary (worth 0.6 only together), c a dummy: v(∅) = 0.1
    players = ["a", "b", "c"]
    values = game(lambda s: 0.1 + (0.6 if {"a", "b"} <= s else 0.0), players)
    phi = shapley(values, players)
    assert sum(phi.values()) == pytest.approx(values[frozenset(players)] - values[frozenset()])
    assert phi["a"] == pytest.approx(phi["b"]) == pytest.approx(0.3)
    assert phi["c"] == pytest.approx(0.0)


def test_shapley_of_a_known_four_player_game():
    # the glove game: L = {a}, R = {b, c, d}, v(S) = min(|S∩L|, |S∩R|): a gets 3/4, each right glove 1/12
    values = game(lambda s: min(len(s & {"a"}), len(s & {"b", "c", "d"})), "abcd")
    assert shapley(values, "abcd") == pytest.approx({"a": 0.75, "b": 1 / 12, "c": 1 / 12, "d": 1 / 12})


def test_imbalance_degree():
    assert imbalance_degree({"audio": 0.3, "visual": 0.1}) == pytest.approx(0.2 / 0.4)
    assert imbalance_degree({"a": 0.2, "b": 0.2, "c": 0.2}) == 0.0
    assert imbalance_degree({"a": 0.4, "b": 0.0, "c": 0.0}) == 1.0
    assert imbalance_degree({"a": 0.3, "b": -0.1}) == pytest.approx(0.4 / 0.4)
    assert math.isnan(imbalance_degree({"a": 0.0, "b": 0.0}))
    assert math.isnan(imbalance_degree({"audio": 0.7}))  # a unimodal model: no balance to measure


def balancebenchmark_shapley(modalitys, v):
    """BalanceBenchmark's Calculate_Shapley (balancemm/evaluation/modalitys.py), transcribed:
    `v(combo)` stands for trainer.val_loop(..., limit_modalitys=combo)['acc']['output']."""
    n = len(modalitys)
    out = {}
    for modality in modalitys:
        out[modality] = 0.0
        temp = [m for m in modalitys if m != modality]
        for r in range(len(temp) + 1):
            for combo in itertools.combinations(temp, r):
                combo = list(combo)
                out[modality] += (math.factorial(len(combo)) * math.factorial(n - len(combo) - 1)) / math.factorial(n) \
                    * (v(sorted([*combo, modality])) - v(combo))
    return out


def masked_accuracy(method, split, present, mask):
    """Joint training's fused test accuracy with every modality outside `present` absent, by hand:
    its input zeroed (mask "input"), or its encoder's output replaced by zeros before the fusion."""
    with torch.no_grad():
        if mask == "input":
            inputs = {m: x if m in present else torch.zeros_like(x) for m, x in split.inputs.items()}
            fused = method.predict(Batch(inputs, split.labels)).fused
        else:
            feats = {m: method.encoders[m](x) for m, x in split.inputs.items()}
            fused = method.fusion({m: f if m in present else torch.zeros_like(f) for m, f in feats.items()})
    return float((fused.argmax(dim=1) == split.labels).float().mean())


@pytest.mark.parametrize("mask", ["features", "input"])
@pytest.mark.parametrize("dataset", ["gaussian", "gaussian3"])
def test_recorded_contributions_match_a_hand_computation(dataset, mask, fast_config, store):
    cfg = fast_config(f"dataset.name={dataset}", "train.epochs=2", "eval.probe=false", "eval.contribution=true",
                      f"eval.contribution_mask={mask}")
    result = run(cfg, store)
    rd = RunDir(result.path)
    method = build_checked(cfg, build_dataset)
    method.load_state_dict(rd.load(rd.best)["model"])
    method.eval()
    split = build_dataset(cfg).split("test")
    names = sorted(method.modality_names)
    v = {frozenset(s): masked_accuracy(method, split, set(s), mask)
         for r in range(len(names) + 1) for s in itertools.combinations(names, r)}
    # by hand: the mean over every order of adding the modalities of each one's marginal gain
    orders = list(itertools.permutations(names))
    by_hand = {m: sum(v[frozenset(o[:o.index(m) + 1])] - v[frozenset(o[:o.index(m)])] for o in orders) / len(orders)
               for m in names}
    recorded = result.summary["contribution"]
    assert recorded["test"]["mask"] == mask
    assert recorded["test"]["shapley"] == pytest.approx(by_hand, abs=1e-12)
    assert recorded["test"]["shapley"] == pytest.approx(balancebenchmark_shapley(names, lambda c: v[frozenset(c)]))
    assert recorded["test"]["coalitions"]["+".join(names)] == pytest.approx(result.summary["best_val"]["test"]["acc"])
    assert recorded["test"]["imbalance_degree"] == pytest.approx(imbalance_degree(by_hand))
    metrics = rd.read_metrics()
    assert recorded["val"] == metrics[recorded["epoch"]]["contribution"]
    for record in metrics:  # every epoch: val coalitions' full set is the fused val accuracy
        assert record["contribution"]["coalitions"]["+".join(names)] == pytest.approx(record["val"]["acc"])
        assert sorted(record["contribution"]["shapley"]) == names


def test_the_two_masks_differ_where_an_encoder_puts_out_something_for_a_zero_input(fast_config):
    """An MLP encoder's biases: a zeroed input is not zero features, so the masks are two games."""
    cfg = fast_config("eval.probe=false")
    method = build_checked(cfg, build_dataset)
    split = build_dataset(cfg).split("test")
    batch = Batch(split.inputs, split.labels)
    with torch.no_grad():
        by_input = method.predict_masked(batch, frozenset({"audio"}), "input").fused
        by_features = method.predict_masked(batch, frozenset({"audio"}), "features").fused
        alone = method.fusion({"audio": method.encoders["audio"](batch.inputs["audio"]),
                               "visual": torch.zeros(len(batch), method.encoders["visual"].out_dim)})
    assert torch.equal(by_features, alone) and not torch.allclose(by_input, by_features)


def test_greedy_masks_the_features_its_branches_end_with(fast_config):
    cfg = fast_config("method.name=greedy", "model.fusion=late", "eval.probe=false")
    method = build_checked(cfg, build_dataset).eval()
    split = build_dataset(cfg).split("test")
    batch = Batch(split.inputs, split.labels)
    with torch.no_grad():
        feats = method.branches(batch.inputs)
        by_hand = method.fusion({"audio": torch.zeros_like(feats["audio"]), "visual": feats["visual"]})
        assert torch.equal(method.predict_masked(batch, frozenset({"visual"})).fused, by_hand)
        assert method.predict_masked(batch, frozenset({"visual"}), "input").fused.shape == by_hand.shape


def test_a_method_that_bypasses_its_encoder_module_is_told_to_override(fast_config, monkeypatch):
    cfg = fast_config("eval.probe=false")
    method = build_checked(cfg, build_dataset)
    split = build_dataset(cfg).split("test")
    batch = Batch(split.inputs, split.labels)
    blocks = {m: list(enc.children()) for m, enc in method.encoders.items()}

    def by_blocks(inputs):  # runs each encoder's blocks itself: no call of the encoder module
        return {m: torch.nn.Sequential(*blocks[m])(x) for m, x in inputs.items()}

    monkeypatch.setattr(method, "encode", by_blocks)
    with pytest.raises(ConfigError, match="did not call its encoder of 'visual' as a whole.*override predict_masked"):
        method.predict_masked(batch, frozenset({"audio"}))


def test_switch_off_records_nothing_and_keeps_the_run_id(fast_config, store):
    on, off = fast_config("eval.contribution=true"), fast_config()
    assert on.run_id() == off.run_id() == fast_config("eval.contribution=true", "eval.contribution_mask=input").run_id()
    assert on.eval.contribution_mask == "features"
    assert on.eval.contribution and not off.eval.contribution  # off by default (its cost: bench/config.py)
    result = run(fast_config("train.epochs=1", "eval.probe=false", "eval.contribution=false"), store)
    assert result.summary["contribution"] == {}
    assert "contribution" not in RunDir(result.path).read_metrics()[0]


def test_report_writes_the_contribution_table_and_figure(fast_config, store, tmp_path):
    summaries = [run(fast_config(f"method.name={m}", f"train.seed={s}", "train.epochs=2", "eval.probe=false",
                                 "eval.contribution=true"), store).summary for m in ("joint", "ogm_ge") for s in (0, 1)]
    report = build_report(store.root / "default", tmp_path / "report")
    table = pd.read_csv(tmp_path / "report" / "aggregate.csv")
    for method in ("joint", "ogm_ge"):
        row = table[table["label"] == method].iloc[0]
        runs = [s for s in summaries if s["method"] == method]
        for m in ("audio", "visual"):
            expected = [s["contribution"]["test"]["shapley"][m] for s in runs]
            assert row[f"shapley.{m}:mean"] == pytest.approx(sum(expected) / 2)
        assert row["imbalance:mean"] == pytest.approx(
            sum(s["contribution"]["test"]["imbalance_degree"] for s in runs) / 2)
    readme = (tmp_path / "report" / "README.md").read_text()
    assert "Modality contribution" in readme and "imbalance degree" in readme
    assert (tmp_path / "report" / "figures" / "contribution.png") in report.files
    assert json.loads((store.root / "default").joinpath(summaries[0]["run_id"], "summary.json").read_text())[
        "contribution"]["epoch"] == summaries[0]["best_val"]["epoch"]
