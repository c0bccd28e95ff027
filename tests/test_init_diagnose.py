"""`mmbalance init` and `mmbalance diagnose` on own data with a built-in imbalance (a PNG colour
that gives the class at once, npy vectors that give it slowly: tests/fixtures/imbalanced.py),
through `prepare manifest` as a user makes the cache: the starter sweep is valid, trains and says
why; the diagnosis names the dominant and the under-trained modality."""

from __future__ import annotations

import json

import pytest
import yaml

from mmbalance.bench.cli import main as cli
from mmbalance.bench.store import Store
from mmbalance.bench.sweep import load_sweep
from mmbalance.bench.train import run
from mmbalance.core.registry import METHODS
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.imbalanced import DOMINANT, SLOW, write_imbalanced

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    prepare("manifest", write_imbalanced(root / "raw"), root / "cache", "small", progress=False)
    return root / "cache"


def test_init_writes_a_commented_sweep_that_dry_runs_and_trains(cache, tmp_path, capsys):
    out = tmp_path / "my_sweep.yaml"
    assert cli(["--results", str(tmp_path / "results"), "init", str(cache), "--out", str(out),
                "--budget-minutes", "3", "--lr-steps", "60"]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    data = yaml.safe_load(text)
    # every choice explained where it is made
    for words in ("# Encoders", "Rule: small encoders unless a GPU", "# Learning rate", "range test",
                  "# Epochs", "budget", "# Cells: every registered method"):
        assert words in text, words
    encoders = data["base"]["model"]["encoders"]
    assert {m: e["name"] for m, e in encoders.items()} == {"image": "small_cnn", "sensor": "mlp"}
    assert data["base"]["train"]["batch_size"] == 8  # 84 training rows: 64 halved until 8 steps an epoch
    assert data["seeds"] == [0, 1, 2]
    lr, epochs = data["base"]["optim"]["lr"], data["base"]["train"]["epochs"]
    assert 1e-4 <= lr <= 1 and 2 <= epochs <= 100
    assert f"lr {lr:g}" in printed and f"{epochs} epochs" in printed
    # every registered method is a cell, plus one unimodal reference per modality
    methods = {c["method.name"] for c in data["cells"].values()}
    assert methods == set(METHODS.names())
    assert {"unimodal-image", "unimodal-sensor"} <= set(data["cells"])
    assert sum(data["cells"]["mie"]["method.epoch_list"]) == epochs
    di_mml = data["cells"]["di_mml"]
    assert di_mml["method.stage1_epochs"] + di_mml["method.stage2_epochs"] == epochs

    assert cli(["--results", str(tmp_path / "results"), "sweep", str(out), "--dry-run"]) == 0
    runs = len(data["cells"]) * 3
    assert f"{runs} runs: {runs} new" in capsys.readouterr().out  # every model built and checked, nothing run
    # one cell of it, one epoch, unedited otherwise: the chosen rate trains
    _, configs = load_sweep(out, ["train.epochs=1", "train.progress=false"])
    joint = next(c for c in configs if c.label == "joint" and c.train.seed == 0)
    result = run(joint, Store(tmp_path / "results"))
    assert result.state == "finished"
    assert result.summary["best_val"]["test"]["acc"] >= 0.9  # the colour alone gives the class


def test_init_refuses_to_overwrite_and_says_what_was_given(cache, tmp_path, capsys):
    out = tmp_path / "s.yaml"
    out.write_text("mine\n")
    args = ["init", str(cache), "--out", str(out), "--lr", "0.02", "--epochs", "4"]
    assert cli(args) == 2
    assert "exists; choose another --out or pass --force" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert cli([*args, "--force"]) == 0
    text = out.read_text()
    assert "Learning rate 0.02: given on the command line" in text and "Epochs 4: given on the command line" in text
    assert yaml.safe_load(text)["base"]["train"]["epochs"] == 4


def test_init_bad_arguments_and_a_folder_that_is_no_cache_are_one_line_errors(cache, tmp_path, capsys):
    assert cli(["init", str(cache), "--out", str(tmp_path / "s.yaml"), "--seeds", "0"]) == 2
    assert "--seeds (0) and --epochs (None) must be at least 1" in capsys.readouterr().err
    assert cli(["init", str(tmp_path), "--out", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not a prepared cache (no meta.json)" in err and "mmbalance prepare" in err and "Traceback" not in err
    assert not (tmp_path / "s.yaml").exists()


def test_diagnose_names_the_dominant_and_the_under_trained_modality(cache, tmp_path, capsys):
    out = tmp_path / "diagnosis"
    assert cli(["--results", str(tmp_path / "results"), "diagnose", str(cache), "--out", str(out),
                "--epochs", "4", "--lr", "0.01", "--seeds", "5"]) == 0
    printed = capsys.readouterr().out
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["imbalance"] is True
    assert verdict["dominant"] == DOMINANT and verdict["under_trained"] == [SLOW]
    assert verdict["faster_alone"] == DOMINANT
    slow = verdict["modalities"][SLOW]
    # paired over 5 seeds: with 3 the t-interval (t = 4.3) spans 0 for some seeds of the fixture;
    # with 5 it lay above 0 for each of fixture seeds 0-4 (lowest bound 0.06, mean deficits 0.25-0.33)
    assert slow["deficit"]["n"] == 5 and slow["deficit"]["ci_low"] > 0
    assert slow["probe_alone"]["mean"] - slow["probe_joint"]["mean"] == pytest.approx(slow["deficit"]["mean"])
    assert verdict["modalities"][DOMINANT]["own_joint"]["mean"] > slow["own_joint"]["mean"]
    assert f"Imbalance: yes. {DOMINANT} dominates; {SLOW} is under-trained" in printed
    for name in ("verdict.md", "diagnosis.png", "diagnosis.pdf", "sweep.yaml"):
        assert (out / name).stat().st_size > 0
    assert "![diagnosis](diagnosis.png)" in (out / "verdict.md").read_text()
    # the runs are ordinary runs of the store: a second diagnosis reuses them
    assert cli(["--results", str(tmp_path / "results"), "diagnose", str(cache), "--out", str(out),
                "--epochs", "4", "--lr", "0.01", "--seeds", "5"]) == 0
    assert json.loads((out / "verdict.json").read_text())["modalities"] == verdict["modalities"]
