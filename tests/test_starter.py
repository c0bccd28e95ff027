"""The parts of `mmbalance init` one by one, on the in-memory Gaussian data where a model is needed:
the encoder and batch rules, each method's stages fitted to any epoch budget (the models build),
the learning-rate range test (its reading of a curve, its determinism, a rate that trains), the
timing of a run on a few rows and the epochs that fit a budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmbalance.bench.budget import FewRows, RunCost, fit_epochs, time_overhead, time_run
from mmbalance.bench.config import load_config
from mmbalance.bench.lr_range import BELOW_MINIMUM, RangeTest, range_test, schedule, smooth
from mmbalance.bench.starter import (
    MAX_BATCH,
    MIN_BATCH,
    batch_size_for,
    choose_encoders,
    epoch_settings,
    method_cells,
    min_epochs,
)
from mmbalance.bench.train import build_checked, build_dataset
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Modality
from mmbalance.datasets.base import TensorSplit

GAUSSIAN = ["dataset.name=gaussian", "train.progress=false", "train.batch_size=32"]
IMAGE, SPEC, VECTOR = Modality("image", "image", (3, 1, 96, 96)), Modality("audio", "audio", (1, 128, 32)), \
    Modality("feat", "vector", (40,))


# ---- encoders and batch -------------------------------------------------------------------------


def test_small_encoders_on_cpu_whatever_the_inputs():
    chosen = choose_encoders([IMAGE, SPEC, VECTOR], n_train=50_000, gpu=False)
    names = {m: c.section["name"] for m, c in chosen.items()}
    assert names == {"image": "small_cnn", "audio": "small_cnn", "feat": "mlp"}
    assert {c.section["out_dim"] for c in chosen.values()} == {64}  # one feature size: MLA, DI-MML
    assert chosen["image"].section["channels"] == [32, 64]  # many samples: the wider small CNN
    assert "96x96 input on a CPU" in chosen["image"].why


def test_resnet18_only_on_a_gpu_for_large_inputs_and_enough_samples():
    chosen = choose_encoders([IMAGE, SPEC, VECTOR], n_train=5000, gpu=True)
    names = {m: c.section["name"] for m, c in chosen.items()}
    assert names == {"image": "resnet18", "audio": "small_cnn", "feat": "mlp"}  # audio's 32 frames: small
    assert chosen["audio"].section["out_dim"] == chosen["feat"].section["out_dim"] == 512  # ResNet18's size
    few = choose_encoders([IMAGE], n_train=500, gpu=True)["image"]
    assert few.section["name"] == "small_cnn" and few.section["channels"] == [16, 32] and "500 training" in few.why


@pytest.mark.parametrize("n_train, batch", [(10_000, MAX_BATCH), (512, 64), (511, 32), (84, MIN_BATCH), (5, MIN_BATCH)])
def test_batch_leaves_an_epoch_at_least_eight_steps(n_train, batch):
    assert batch_size_for(n_train) == batch


# ---- methods fitted to the epochs ---------------------------------------------------------------


@pytest.mark.parametrize("epochs", [2, 3, 5, 12, 100])
def test_every_method_builds_at_any_epoch_budget(epochs):
    encoders = {m: {"name": "mlp", "hidden": 32, "out_dim": 16} for m in ("audio", "visual")}
    cells = method_cells(METHODS.names(), epochs, ["audio", "visual"], encoders)
    assert list(cells)[0] == "joint" and {"unimodal-audio", "unimodal-visual"} <= set(cells)
    for cell in cells.values():
        overrides = [f"{k}={v}" for k, v in cell.items()]
        cfg = load_config(None, [*GAUSSIAN, f"train.epochs={epochs}", "model.encoders.audio.name=mlp",
                                 "model.encoders.visual.name=mlp", *overrides])
        build_checked(cfg, build_dataset)  # a stage that does not fit raises ConfigError (teachers: stand-ins)


def test_stage_rules():
    small = {"a": {"name": "small_cnn", "out_dim": 64}, "b": {"name": "small_cnn", "out_dim": 64}}
    assert epoch_settings("mie", 10, ["a", "b", "c"], small) == {"epoch_list": [4, 3, 3]}
    assert epoch_settings("di_mml", 10, ["a", "b"], small) == {"stage1_epochs": 8, "stage2_epochs": 2,
                                                                "duc_start_epoch": 2, "tau": 1.0}
    assert "tau" not in epoch_settings("di_mml", 10, ["a", "b"], {"a": {"name": "resnet18"}})
    assert epoch_settings("ogm_ge", 10, ["a", "b"], small) == {"modulation_ends": 5}
    assert epoch_settings("ogm_ge", 10, ["a", "b"], {**small, "b": {"name": "mlp"}})["param_filter"] == "all_encoder"
    assert epoch_settings("joint", 10, ["a", "b"], small) == {}
    assert epoch_settings("relearning", 90, ["a", "b"], small) == {"reinit_epoch": 20, "reinit_num": 3}
    assert epoch_settings("relearning", 12, ["a", "b"], small) == {"reinit_epoch": 3, "reinit_num": 3}
    assert epoch_settings("relearning", 3, ["a", "b"], small) == {"reinit_epoch": 1, "reinit_num": 1}
    assert epoch_settings("relearning", 2, ["a", "b"], small) == {"variant": "balancebenchmark", "reinit_epoch": 1,
                                                                  "reinit_num": 1}
    assert min_epochs(["a", "b"]) == 2 and min_epochs(["a", "b", "c"]) == 3


# ---- the learning-rate range test ---------------------------------------------------------------


def test_schedule_and_smoothing():
    assert schedule(0, 50, 1e-4, 10.0) == pytest.approx(1e-4)
    assert schedule(49, 50, 1e-4, 10.0) == pytest.approx(10.0)
    assert schedule(1, 50, 1e-4, 10.0) / schedule(0, 50, 1e-4, 10.0) == pytest.approx(1e5 ** (1 / 49))
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull to 0
    assert smooth([1.0, 3.0])[1] == pytest.approx((0.09 * 1 + 0.1 * 3) / 0.19)


def curve(losses: list[float]) -> RangeTest:
    lrs = [schedule(i, len(losses), 1e-4, 10.0) for i in range(len(losses))]
    return RangeTest(lrs, losses, smooth(losses))


def test_suggestion_is_the_lower_of_a_tenth_of_the_minimum_and_the_steepest_descent():
    # flat, then a descent from step 20 to 40 steepest at 25, a plateau near zero, then divergence
    drop = [2.0 - 1.9 * (1 - math.exp(-(i - 20) / 3)) for i in range(20, 45)]
    losses = [2.0] * 20 + drop + [0.1 + 0.5 * i for i in range(10)]
    t = curve(losses)
    assert t.lr_at_minimum == t.lrs[int(np.argmin(t.smoothed))]
    assert 20 <= t.lrs.index(t.steepest) <= 26  # where the smoothed loss falls fastest
    assert t.suggested == min(t.lr_at_minimum / BELOW_MINIMUM, t.steepest) == t.steepest
    # a curve that descends until it blows up: a tenth of the minimum is the lower
    late = curve([2.0 - 0.03 * i for i in range(60)] + [5.0, 20.0])
    assert late.suggested == pytest.approx(late.lr_at_minimum / BELOW_MINIMUM)


def test_range_test_is_deterministic_stops_on_divergence_and_its_rate_trains(one_torch_thread):
    cfg = load_config(None, [*GAUSSIAN, "method.name=joint"])
    first, again = range_test(cfg, steps=60), range_test(cfg, steps=60)
    assert first.losses == again.losses and first.lrs == again.lrs
    # these separable classes leave the loss near zero up to lr 10: the tenth of the minimum would be 1
    assert first.stopped == "reached lr_max" and first.lr_at_minimum / BELOW_MINIMUM > 10 * first.steepest
    diverging = range_test(cfg, steps=60, lr_max=1e3)
    assert diverging.stopped.startswith("diverged") and len(diverging.lrs) < 60
    assert diverging.smoothed[-1] > 4 * min(diverging.smoothed)
    lr = first.suggested
    start = range_test(load_config(None, [*GAUSSIAN, "method.name=joint"]), steps=2, lr_min=lr, lr_max=lr)
    trained = range_test(load_config(None, [*GAUSSIAN, "method.name=joint"]), steps=40, lr_min=lr, lr_max=lr)
    assert trained.smoothed[-1] < 0.5 * start.losses[0]  # at the suggested rate the loss halves in 40 steps


# ---- timing and the epoch budget ----------------------------------------------------------------


def test_few_rows_are_spread_over_the_split_and_keep_views_classes_and_in_memory_splits():
    cfg = load_config(None, GAUSSIAN)  # 128 training rows
    full = build_dataset(cfg)
    few = FewRows(full, 10)
    data, finish = few.loader_split("train", augment=True, on_device=False)
    assert isinstance(data, TensorSplit) and len(data) == 10 and finish == {}
    spread = [round(i * 127 / 9) for i in range(10)]  # first, last and evenly between
    assert torch.equal(data.labels, full.split("train").labels[spread])
    assert few.modalities == full.modalities and few.num_classes == full.num_classes
    assert len(FewRows(full, 10**6).split("val")) == len(full.split("val"))


def test_time_run_extrapolates_from_the_measured_rates_and_the_overhead(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)  # nothing may be written outside the scratch stores
    cfg = load_config(None, [*GAUSSIAN, "method.name=joint"])
    sizes = {"train": 1000, "val": 100, "test": 300}
    overhead = time_overhead(cfg)
    assert overhead.epoch_s >= 0 and overhead.run_s > 0  # a run's start-up and probes take time
    cost = time_run(cfg, sizes, overhead=overhead)
    assert cost.train_samples_per_s > 0 and cost.eval_s_per_sample > 0
    expected = 1000 / cost.train_samples_per_s + 400 * cost.eval_s_per_sample + overhead.epoch_s
    assert cost.epoch_s == pytest.approx(expected)
    assert cost.fixed_s == pytest.approx(1400 * cost.eval_s_per_sample + overhead.run_s)
    assert cost.run_s(3) == pytest.approx(3 * cost.epoch_s + cost.fixed_s)
    assert list(tmp_path.iterdir()) == []


def test_epochs_fit_the_budget():
    costs = [RunCost("a", 100.0, 0.0, 2.0, 1.0), RunCost("b", 100.0, 0.0, 1.0, 0.0)]
    fit = fit_epochs(costs, seeds=3, budget_s=100.0, lowest=2, highest=100)  # 3 x (3 E + 1) <= 100
    assert fit.epochs == 10 and fit.fits and fit.estimated_s == pytest.approx(3 * (3 * 10 + 1))
    assert fit_epochs(costs, 3, 10**6, 2, 100).epochs == 100
    short = fit_epochs(costs, 3, 10.0, 2, 100)
    assert short.epochs == 2 and not short.fits and "OVER" in short.describe()
