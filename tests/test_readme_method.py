"""README's "Adding a method" example is complete, public-API-only code: imported from the README
itself, it registers its method, which trains for an epoch on the embedded data through
`mmbalance run` and logs what it says it logs."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import yaml

from mmbalance.bench.cli import main
from mmbalance.bench.store import Store
from mmbalance.core.registry import METHODS
from tests.test_method_contract import context_bypasses, foreign_private_names

README = Path(__file__).parent.parent / "README.md"
PUBLIC = {"mmbalance.core.errors", "mmbalance.core.params", "mmbalance.core.registry", "mmbalance.core.types",
          "mmbalance.methods.base"}


def example_code() -> str:
    """The first python block of README's "## Adding a method" section."""
    section = README.read_text().split("## Adding a method\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's 'Adding a method' section has no python block"
    return blocks[0]


def import_example(path: Path):
    spec = importlib.util.spec_from_file_location("readme_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_is_complete_and_public():
    code = example_code()
    assert "..." not in code
    imported = set(re.findall(r"^from (mmbalance\.\S+) import", code, flags=re.M))
    assert imported and imported <= PUBLIC, imported - PUBLIC
    assert foreign_private_names(code) == [] and context_bypasses(code) == []


def test_the_example_trains_through_the_harness(tmp_path, capsys):
    path = tmp_path / "readme_method.py"
    path.write_text(example_code())
    module = import_example(path)
    try:
        assert METHODS.get("weighted_late") is module.WeightedLate
        config = {"group": "readme", "dataset": {"name": "avdigits", "preset": "audio-dominant"},
                  "model": {"encoders": {m: {"name": "mlp", "hidden": 32, "out_dim": 16} for m in ("audio", "visual")}},
                  "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "train": {"epochs": 1, "batch_size": 64, "progress": False}, "eval": {"probe": False}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        results = tmp_path / "results"
        args = ["--results", str(results), "run", str(tmp_path / "run.yaml"), "method.name=weighted_late"]
        assert main([*args, "method.weights.audio=0.5"]) == 0
        (run,) = Store(results).runs("readme")
        assert run.status()["state"] == "finished"
        (record,) = run.read_metrics()
        assert {"loss", "loss.audio", "loss.visual"} <= set(record["train"])
        assert math.isfinite(record["train"]["loss"])
        assert 0.2 < record["val"]["acc"] <= 1  # 10 classes: well above chance after an epoch
        assert set(record["val"]["modality_acc"]) == {"audio", "visual"}
        assert 0 <= record["method"]["agree"] <= 1  # Prediction.logs, averaged over validation
        assert run.read_summary()["best_val"]["epoch"] == 0
        # its parameter errors name the key and what is allowed
        assert main([*args, "method.weights.audoi=0.5"]) == 2
        assert "method.weights names audoi, not a modality of this dataset; its modalities: audio, visual" \
            in capsys.readouterr().err
    finally:
        sys.modules.pop("readme_method", None)
