"""Every method trains through `mmbalance run` on the ResNet18 config (slow: ~1 min a method on 2 cores)."""

from __future__ import annotations

import json

import pytest

from mmbalance.bench.cli import main
from mmbalance.bench.resources import configs_dir

CONFIG = configs_dir() / "avdigits_resnet18.yaml"
METHOD_OVERRIDES = {
    "joint": [],
    "ogm_ge": ["method.modulation_ends=1"],
    "mla": [],
    "mie": ["method.epoch_list=[1,1]"],
    "di_mml": ["method.stage1_epochs=1", "method.stage2_epochs=1", "method.duc_start_epoch=0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_method_trains_on_resnet18(method, tmp_path, capsys):
    args = ["--results", str(tmp_path), "run", str(CONFIG), f"method.name={method}", "train.epochs=2",
            "train.progress=false", "eval.probe_c_grid=[1.0]", *METHOD_OVERRIDES[method]]
    assert main(args) == 0
    (summary_path,) = tmp_path.glob("default/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert 0.0 <= summary["best_val"]["test"]["acc"] <= 1.0
    assert set(summary["probes"]) == {"audio", "visual"}
    # above chance (0.1) after two epochs: the ResNet18s learned something
    assert max(p["test_acc"] for p in summary["probes"].values()) > 0.2
