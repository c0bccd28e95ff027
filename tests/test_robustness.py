"""Robustness at test (bench.robustness): each modality zeroed and noised on best.pt, its CLI,
`eval.robustness` in a run, and the report's table and figure."""

from __future__ import annotations

import json

import pytest
import torch

from mmbalance.bench import robustness as rb
from mmbalance.bench.cli import main
from mmbalance.bench.config import load_config, validate
from mmbalance.bench.evaluate import evaluate
from mmbalance.bench.report.build import build_report
from mmbalance.bench.store import Store
from mmbalance.bench.train import Trainer, run
from mmbalance.core.types import Batch
from tests.conftest import FAST

TINY = [*FAST, "train.epochs=3", "eval.probe=false", "train.threads=1", "group=g"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two seeds of joint and one of unimodal on the Gaussian data, trained without robustness."""
    store = Store(tmp_path_factory.mktemp("robust") / "results")
    for overrides in (["train.seed=0"], ["train.seed=1"], ["method.name=unimodal", "method.modality=audio"]):
        run(load_config(None, [*TINY, *overrides]), store)
    return store


def loaded(run_dir):
    trainer = Trainer(validate(run_dir.read_config()), run_dir)
    trainer.method.load_state_dict(run_dir.load(run_dir.best)["model"])
    return trainer


def test_zeroed_accuracy_is_an_evaluation_with_that_modality_zeroed_by_hand(finished):
    run_dir = next(finished.runs("g"))
    result = rb.evaluate_trained(loaded(run_dir), run_dir)
    trainer = loaded(run_dir)
    for m in ("audio", "visual"):
        by_hand = [Batch({**b.inputs, m: torch.zeros_like(b.inputs[m])}, b.labels) for b in trainer.loaders["test"]()]
        expected = evaluate(trainer.method, by_hand, trainer.context.autocast).metrics["acc"]
        assert result["modalities"][m]["zeroed"] == expected
    assert run_dir.read_robustness() == json.loads(json.dumps(result))


def test_level_zero_is_the_clean_test_accuracy_of_the_selected_epoch(finished):
    for run_dir in finished.runs("g"):
        result = rb.evaluate_trained(loaded(run_dir), run_dir)
        summary = run_dir.read_summary()
        assert result["epoch"] == summary["best_val"]["epoch"]
        assert result["clean"] == summary["best_val"]["test"]["acc"]
        for entry in result["modalities"].values():
            assert entry["noise"]["0.0"] == result["clean"]


def test_results_are_reproducible_and_noise_hurts(finished):
    run_dir = next(finished.runs("g"))
    first = rb.evaluate_trained(loaded(run_dir), run_dir)
    assert rb.evaluate_trained(loaded(run_dir), run_dir) == first
    for entry in first["modalities"].values():  # the Gaussian data's separation is < 2 stds per modality
        assert entry["noise"]["2.0"] < entry["noise"]["0.0"]


def test_gaussian_noise_has_the_level_times_the_input_std():
    x = torch.randn(4000, 8) * 3 + 1
    scale = rb.scales(lambda: [Batch({"a": x}, torch.zeros(4000, dtype=torch.long))])["a"]
    assert scale.corruption == "gaussian" and scale.std == pytest.approx(float(x.double().std()), rel=1e-3)
    noisy = rb.corrupt(x, scale, 0.5, rb.generator(0, 0, 1))
    assert float((noisy - x).std()) == pytest.approx(0.5 * scale.std, rel=0.02)
    assert torch.equal(rb.corrupt(x, scale, 0.0, rb.generator(0, 0, 0)), x)
    assert torch.equal(noisy, rb.corrupt(x, scale, 0.5, rb.generator(0, 0, 1)))
    assert not torch.equal(noisy, rb.corrupt(x, scale, 0.5, rb.generator(1, 0, 1)))  # the run's seed counts


def test_token_ids_are_replaced_by_ids_of_the_split_with_probability_min_level_1():
    ids = torch.randint(3, 9, (500, 12), dtype=torch.int32)
    scale = rb.scales(lambda: [Batch({"text": ids}, torch.zeros(500, dtype=torch.long))])["text"]
    assert scale.corruption == "token_replace" and scale.ids.tolist() == list(range(3, 9))
    for level, share in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (2.0, 1.0)):
        out = rb.corrupt(ids, scale, level, rb.generator(0, 0, 0))
        assert out.dtype == ids.dtype and set(out.unique().tolist()) <= set(range(3, 9))
        changed = (out != ids).float().mean().item()
        assert changed == pytest.approx(share * 5 / 6, abs=0.03)  # a draw equal to the old id changes nothing


def test_cli_evaluates_each_run_once_unless_forced(finished, capsys):
    group = finished.root / "g"
    for run_dir in finished.runs("g"):
        run_dir.robustness.unlink(missing_ok=True)
    assert main(["evaluate-robustness", str(group)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("clean" in line and "audio zeroed" in line for line in lines)
    stamps = {rd.run_id: rd.robustness.stat().st_mtime_ns for rd in finished.runs("g")}
    assert main(["evaluate-robustness", str(group)]) == 0
    assert all("skipped (evaluated already" in line for line in capsys.readouterr().out.splitlines())
    assert stamps == {rd.run_id: rd.robustness.stat().st_mtime_ns for rd in finished.runs("g")}
    one = next(finished.runs("g"))
    assert main(["evaluate-robustness", str(one.path), "--force"]) == 0
    assert capsys.readouterr().out.count("clean") == 1


def test_report_writes_the_table_and_figure_only_when_runs_have_results(finished, tmp_path):
    for run_dir in finished.runs("g"):
        if not run_dir.robustness.exists():
            rb.evaluate_trained(loaded(run_dir), run_dir)
    out = tmp_path / "report"
    report = build_report(finished.root / "g", out)
    table = (out / "robustness.csv").read_text()
    assert (out / "figures" / "robustness.png").exists() and out / "robustness.md" in report.files
    import pandas as pd

    rows = pd.read_csv(out / "robustness.csv")
    assert set(rows["condition"]) == {"zeroed", "noise 0", "noise 0.25", "noise 0.5", "noise 1", "noise 2"}
    joint = rows[(rows["label"] == "joint") & (rows["modality"] == "audio") & (rows["condition"] == "zeroed")]
    values = [rd.read_robustness()["modalities"]["audio"]["zeroed"] for rd in finished.runs("g")
              if rd.read_config()["method"]["name"] == "joint"]
    assert len(joint) == 1 and joint["n"].item() == 2 and joint["mean"].item() == pytest.approx(sum(values) / 2)
    assert "Robustness" in (out / "README.md").read_text() and "zeroed" in table
    for run_dir in finished.runs("g"):
        run_dir.robustness.unlink()
    bare = tmp_path / "bare"
    build_report(finished.root / "g", bare)
    assert not (bare / "robustness.md").exists() and not list((bare / "figures").glob("robustness*"))


@pytest.mark.parametrize("text, why", [
    ('{"clean": 0.5, "modalities": {"audio": {"zeroed": 0.4, "noise"', "not JSON at line 1"),
    ('{"clean": 0.5}', "modalities is missing"),
    ('{"clean": 0.5, "modalities": {"audio": {"zeroed": 1.7, "noise": {"0.0": 0.5}}}}', "zeroed"),
    ('{"clean": 0.5, "modalities": {"audio": {"zeroed": 0.4, "noise": {"loud": 0.5}}}}', "noise level 'loud'"),
])
def test_a_damaged_robustness_file_is_left_out_by_name_and_evaluated_again(finished, tmp_path, capsys, logged,
                                                                            text, why):
    """The report leaves the run's robustness out, saying which file and why (the others stay);
    `evaluate-robustness` writes it again without --force."""
    runs = list(finished.runs("g"))
    for run_dir in runs:
        if not run_dir.robustness.exists():
            rb.evaluate_trained(loaded(run_dir), run_dir)
    bad = runs[0]
    bad.robustness.write_text(text)
    out = tmp_path / "report"
    build_report(finished.root / "g", out)
    note = (out / "robustness.md").read_text()
    assert f"Left out, damaged: g/{bad.run_id}/robustness.json" in note and why in note
    assert f"robustness: left out g/{bad.run_id}/robustness.json" in logged.read()
    import pandas as pd

    assert pd.read_csv(out / "robustness.csv")["n"].sum() > 0  # the other runs are in
    assert main(["evaluate-robustness", str(bad.path)]) == 0
    assert "was damaged" in capsys.readouterr().out and bad.read_robustness()["clean"] >= 0


def test_eval_robustness_writes_its_file_and_keeps_the_run_id(tmp_path):
    plain = load_config(None, TINY)
    cfg = load_config(None, [*TINY, "eval.robustness=true"])
    assert cfg.run_id() == plain.run_id()
    result = run(cfg, Store(tmp_path / "results"))
    data = Store(tmp_path / "results").run_dir("g", result.run_id).read_robustness()
    assert data["clean"] == result.summary["best_val"]["test"]["acc"]
    assert set(data["modalities"]) == {"audio", "visual"}
