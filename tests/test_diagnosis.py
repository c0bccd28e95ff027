"""The diagnosis read from a synthetic store of joint and unimodal-only runs with known numbers:
its statistics are stats.describe's over the per-seed values, the verdict follows the deficit's
interval (and, with one seed, its sign past DEFICIT_MIN), the dominant modality is the joint
head's, learning speed is the gain over chance per epoch in the first quarter, and a store
without the runs a diagnosis needs is an error that says so."""

from __future__ import annotations

import json

import pytest

from mmbalance.bench.report.diagnosis import DEFICIT_MIN, diagnose
from mmbalance.bench.report.stats import describe
from mmbalance.bench.store import Store
from mmbalance.core.errors import ConfigError

CLASSES = 4  # chance 0.25
EPOCHS = 8


def curve(first: float, last: float) -> list[float]:
    """Validation accuracy per epoch: `first` after epoch 0, `last` from epoch 1 on."""
    return [first] + [last] * (EPOCHS - 1)


def write_run(store: Store, label: str, seed: int, probes: dict[str, float], acc: float,
              own: dict[str, float], curves: dict[str, list[float]]) -> None:
    """One finished run of group `g`: summary (test acc, own per-modality acc, probes) and per-epoch
    validation accuracy (`curves`: the fused one under '', per modality under its name)."""
    rd = store.run_dir("g", f"{label}-s{seed}")
    method = {"name": "joint"} if label == "joint" else {"name": "unimodal", "modality": label.split("-")[1]}
    rd.write_config({"group": "g", "label": label, "dataset": {"name": "manifest", "root": "/data/own"},
                     "model": {"fusion": "concat"}, "method": method, "train": {"seed": seed, "epochs": EPOCHS}})
    rd.set_status("finished")
    block = {"epoch": EPOCHS - 1, "test": {"acc": acc, "macro_f1": acc, "map": acc, "modality_acc": own}}
    rd.write_summary({"epochs": EPOCHS, "best_val": block, "best_test": block, "last": block,
                      "probes": {m: {"test_acc": v} for m, v in probes.items()}})
    per_modality = {e: {m: c[e] for m, c in curves.items() if m} for e in range(len(curves[""]))}
    rd.write_metrics([{"epoch": e, "val": {"acc": curves[""][e], "modality_acc": per_modality[e]},
                       "test": {"acc": acc}} for e in range(EPOCHS)])


# per seed: (audio probe alone, visual probe alone, audio probe in joint, visual probe in joint)
IMBALANCED = {0: (0.80, 0.70, 0.78, 0.40), 1: (0.82, 0.72, 0.80, 0.45), 2: (0.79, 0.69, 0.80, 0.43)}


def fill(store: Store, probes: dict[int, tuple[float, float, float, float]], own_visual: float = 0.30) -> None:
    for seed, (audio_alone, visual_alone, audio_joint, visual_joint) in probes.items():
        write_run(store, "unimodal-audio", seed, {"audio": audio_alone}, 0.8, {"audio": 0.8}, {"": curve(0.75, 0.8)})
        write_run(store, "unimodal-visual", seed, {"visual": visual_alone}, 0.7, {"visual": 0.7},
                  {"": curve(0.30 + 0.01 * seed, 0.7)})
        write_run(store, "joint", seed, {"audio": audio_joint, "visual": visual_joint}, 0.82,
                  {"audio": 0.79 - 0.01 * seed, "visual": own_visual + 0.02 * seed},
                  {"": curve(0.8, 0.82), "audio": curve(0.7, 0.79), "visual": curve(0.26, 0.3)})


def test_an_under_trained_modality_and_the_dominant_one(tmp_path):
    store = Store(tmp_path / "results")
    fill(store, IMBALANCED)
    d = diagnose(store.root / "g", None, tmp_path / "out", CLASSES)
    visual = [p[1] - p[3] for p in IMBALANCED.values()]
    assert d.modalities["visual"]["deficit"] == pytest.approx(describe(visual))
    assert d.modalities["visual"]["deficit"]["ci_low"] > 0
    audio = describe([p[0] - p[2] for p in IMBALANCED.values()])  # +0.02, +0.02, -0.01: interval spans 0
    assert d.modalities["audio"]["deficit"] == pytest.approx(audio) and audio["ci_low"] < 0
    assert d.imbalance and d.under_trained == ["visual"] and d.dominant == "audio"
    # the head's margin: own audio - own visual per seed
    assert d.head_margin == pytest.approx(describe([(0.79 - 0.01 * s) - (0.30 + 0.02 * s) for s in range(3)]))
    # gain over chance per epoch in the first quarter (2 of 8 epochs): (acc after epoch 1 - 0.25) / 2
    assert d.modalities["audio"]["speed_alone"]["mean"] == pytest.approx((0.8 - 0.25) / 2)
    assert d.modalities["visual"]["speed_alone"]["mean"] == pytest.approx((0.7 - 0.25) / 2)
    assert d.modalities["visual"]["speed_joint"]["mean"] == pytest.approx((0.3 - 0.25) / 2)
    assert d.faster == "audio"
    assert d.verdict().startswith("Imbalance: yes. audio dominates; visual is under-trained by joint training.")
    saved = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert saved["under_trained"] == ["visual"] and saved["modalities"]["visual"]["deficit"]["mean"] == pytest.approx(
        describe(visual)["mean"])
    assert {p.name for p in d.files} == {"verdict.md", "verdict.json", "diagnosis.png", "diagnosis.pdf"}


def test_no_deficit_beyond_noise_is_no_imbalance(tmp_path):
    store = Store(tmp_path / "results")
    fill(store, {0: (0.80, 0.70, 0.80, 0.71), 1: (0.82, 0.72, 0.81, 0.70), 2: (0.79, 0.69, 0.80, 0.70)})
    d = diagnose(store.root / "g", None, tmp_path / "out", CLASSES)
    assert not d.imbalance and d.under_trained == []
    assert d.dominant == "audio"  # the head may still lean on one modality
    assert d.verdict().startswith("Imbalance: not detected at this budget")
    assert json.loads((tmp_path / "out" / "verdict.json").read_text())["imbalance"] is False


@pytest.mark.parametrize("gap, called", [(DEFICIT_MIN + 0.01, True), (DEFICIT_MIN - 0.01, False)])
def test_one_seed_has_no_interval_and_goes_by_the_deficit_alone(tmp_path, gap, called):
    store = Store(tmp_path / "results")
    fill(store, {0: (0.80, 0.70, 0.80, 0.70 - gap)})
    d = diagnose(store.root / "g", None, tmp_path / "out", CLASSES)
    assert d.modalities["visual"]["deficit"]["n"] == 1 and d.imbalance is called
    assert "[" not in d.verdict().split("\n")[2].split("deficit")[1]  # no interval printed for one seed


def test_a_store_without_the_runs_says_what_is_missing(tmp_path):
    store = Store(tmp_path / "results")
    write_run(store, "joint", 0, {"audio": 0.8, "visual": 0.4}, 0.8, {"audio": 0.8, "visual": 0.3},
              {"": curve(0.8, 0.8), "audio": curve(0.7, 0.8), "visual": curve(0.3, 0.3)})
    with pytest.raises(ConfigError, match="needs finished joint and unimodal-only runs; found 1 finished of 1"):
        diagnose(store.root / "g", None, tmp_path / "out", CLASSES)
