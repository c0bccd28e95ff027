"""What a new user runs into (issue 12, item 8) and the one selection rule (item 4): each case a
clear one-line outcome, never a traceback, and the same epoch numbering everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.bench.selection import best_epoch
from mmbalance.bench.store import RunDir, Store, strict_json
from mmbalance.bench.train import run
from mmbalance.core.errors import DataWarning, PluginWarning
from mmbalance.core.registry import METHODS, load_plugin
from mmbalance.datasets.prepare.runner import prepare, split_verdict
from tests.fixtures.manifest import write_audio_image, write_csv


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity tokens, as most JSON readers do."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ---- one selection rule ---------------------------------------------------------------------------


def record(epoch: int, acc: float, f1: float, selectable: bool = True, test: float = 0.5) -> dict:
    return {"epoch": epoch, "selectable": selectable, "val": {"acc": acc, "macro_f1": f1},
            "test": {"acc": test, "macro_f1": test}}


def test_best_epoch_respects_selectable_epochs_the_metric_and_ties():
    history = [record(0, 0.9, 0.9, selectable=False),  # a stage-1 epoch: never reported
               record(1, 0.6, 0.7), record(2, 0.8, 0.5), record(3, 0.6, 0.7)]
    assert best_epoch(history, "acc")["epoch"] == 2
    assert best_epoch(history, "macro_f1")["epoch"] == 1  # the first of two equal maxima
    assert best_epoch(history[:1], "acc") is None
    assert best_epoch([], "acc") is None


def status_cells(capsys, run_id: str) -> list[str]:
    line = next(x for x in capsys.readouterr().out.splitlines() if run_id in x)
    return [c.strip() for c in line.strip("|").split("|")]


def test_status_shows_the_trainers_best_val_epoch(fast_config, store, capsys):
    cfg = fast_config("eval.select_metric=macro_f1", "train.epochs=6")
    run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert cli(["status", str(store.root / cfg.group)]) == 0
    best = rd.read_summary()["best_val"]
    cells = status_cells(capsys, rd.run_id)
    assert cells[4:7] == ["6/6", str(best["epoch"]), f"macro_f1 {best['val']['macro_f1']:.3f}"]
    # an epoch the method does not allow (a stage-1 epoch) with the highest accuracy is never shown
    history = rd.read_metrics()
    forged = 1 if best["epoch"] != 1 else 2
    history[forged].update(selectable=False, val={**history[forged]["val"], "acc": 1.0, "macro_f1": 1.0})
    rd.write_metrics(history)
    assert cli(["status", str(store.root / cfg.group)]) == 0
    assert status_cells(capsys, rd.run_id)[5] == str(best["epoch"])


def test_cli_epoch_numbering_matches_the_store(tmp_path, capsys):
    results = tmp_path / "results"
    config = tmp_path / "run.yaml"
    config.write_text("dataset: {name: gaussian}\ntrain: {epochs: 4, batch_size: 32, progress: false}\n"
                      "optim: {lr: 0.05}\neval: {probe_c_grid: [1.0]}\n")
    assert cli(["--results", str(results), "run", str(config)]) == 0
    out = capsys.readouterr().out
    rd = next(Store(results).runs())
    epoch = rd.read_summary()["best_val"]["epoch"]
    assert f"at best-val epoch {epoch} (epochs count from 0)" in out
    assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2, 3]  # the store counts from 0 too
    assert rd.status()["epochs_done"] == 4 and "epoch" not in rd.status()  # a count, named as one


# ---- the results store on the command line --------------------------------------------------------


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_results_that_is_not_a_directory_is_one_line(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("keep me")
    config = tmp_path / "run.yaml"
    config.write_text("dataset: {name: gaussian}\ntrain: {epochs: 1, progress: false}\n")
    assert cli(["--results", str(tmp_path / where), "run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: results store {str(tmp_path / where)!r} cannot be written: ")
    assert ("it is a file" if where == "a_file" else f"{str(tmp_path / 'a_file')!r} is a file") in err
    assert not (tmp_path / "a_file" / "below").exists()
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_status_of_a_missing_directory_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "results" / "nope"
    assert cli(["status", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {missing}: no such directory; give a run directory, a group directory "
        "(results/<group>) or the store root (results)")
    assert cli(["cancel", str(missing)]) == 2


def test_metrics_with_a_nan_stay_strict_json(tmp_path):
    rd = RunDir(tmp_path / "g" / "r")
    rd.write_metrics([{"epoch": 0, "val": {"loss": float("nan"), "acc": 0.5}, "test": {"acc": float("nan")},
                       "train": {"loss": float("inf")}}])
    lines = rd.metrics.read_text().splitlines()
    assert [strict_loads(x) for x in lines] == [{"epoch": 0, "val": {"loss": None, "acc": 0.5}, "test": {"acc": None},
                                                 "train": {"loss": None}}]
    assert strict_loads(strict_json({"a": [1.0, float("-inf")]})) == {"a": [1.0, None]}


def test_a_diverging_run_leaves_strict_json_records(tmp_path, capsys):
    config = tmp_path / "nan.yaml"  # epoch 0's validation loss is NaN, then the training loss
    config.write_text("dataset: {name: gaussian}\ntrain: {epochs: 3, progress: false}\noptim: {lr: 100000.0}\n")
    assert cli(["--results", str(tmp_path / "results"), "run", str(config)]) == 2
    rd = next(Store(tmp_path / "results").runs())
    records = [strict_loads(x) for x in rd.metrics.read_text().splitlines()]
    assert records and records[0]["val"]["loss"] is None
    strict_loads(rd.status_file.read_text())


# ---- plugins ------------------------------------------------------------------------------------


PLUGIN = '''
from mmbalance.core.registry import METHODS
from mmbalance.methods.joint import Joint


@METHODS.register("{name}")
class Plugged(Joint):
    pass
'''


def write_plugin(root: Path) -> None:
    """A distribution with three plugin entry points: a module, a module:Class, and a broken one."""
    (root / "plug_module.py").write_text(PLUGIN.format(name="plugged_module"))
    (root / "plug_object.py").write_text(PLUGIN.format(name="plugged_object"))
    (root / "plug_broken.py").write_text("raise RuntimeError('this plugin is broken')\n")
    info = root / "plugdist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugdist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [mmbalance.plugins]
        as_module = plug_module
        as_object = plug_object:Plugged
        broken = plug_broken
    """))


def test_plugin_entry_points_in_both_forms_and_a_broken_one_warns(tmp_path, monkeypatch):
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = {name: EntryPoint(name, value, "mmbalance.plugins") for name, value in
           [("as_module", "plug_module"), ("as_object", "plug_object:Plugged"), ("broken", "plug_broken")]}
    load_plugin(eps["as_module"])
    load_plugin(eps["as_object"])
    assert "plugged_module" in METHODS and "plugged_object" in METHODS
    with pytest.warns(PluginWarning, match=r"plugin 'broken' \(plug_broken\) .* RuntimeError: this plugin is broken"):
        load_plugin(eps["broken"])


def test_list_works_beside_a_broken_plugin(tmp_path):
    write_plugin(tmp_path)
    env_path = f"{tmp_path}:{Path(__file__).resolve().parents[1]}"
    done = subprocess.run([sys.executable, "-m", "mmbalance", "list"], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "plugged_module" in done.stdout and "plugged_object" in done.stdout
    assert "warning: plugin 'broken' (plug_broken)" in done.stderr and "Traceback" not in done.stderr


# ---- own data (manifest) --------------------------------------------------------------------------


def test_a_carved_manifest_is_not_called_published(tmp_path):
    csv_path = write_audio_image(tmp_path, split="none", per_class=10)
    report = prepare("manifest", csv_path, tmp_path / "cache", "small", progress=False)
    text = report.summary()
    assert "split is the published one" not in text
    assert "split: the user's CSV, not a published split" in text
    assert "no split column: carved train/val/test = 70/10/20" in text
    assert split_verdict({"source": "x", "is_published_split": True}) == "split is the published one (x): yes"
    assert split_verdict({"source": "x", "is_published_split": False}) == "split is the published one (x): no"


def test_manifest_warns_about_a_class_without_training_rows_and_an_odd_label(tmp_path):
    csv_path = write_audio_image(tmp_path)  # classes cat, dog, owl, 4 rows each (train, train, val, test)
    header, *rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    for row in rows:
        if row[1] == "owl":
            row[2] = "test" if row[2] == "train" else row[2]  # owl: no training row
    rows = [[str(i) if r[1] != "dog" or r[0] != "dog0" else "doggo", *r[1:]] for i, r in enumerate(rows)]
    labels = {"cat": "1", "dog": "2", "owl": "3"}
    rows = [[r[0], labels[r[1]] if r[0] != "0" else "one", *r[2:]] for r in rows]  # row 0 (line 2): a word
    write_csv(csv_path, header, rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prepare("manifest", csv_path, tmp_path / "cache", "small", progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("1 row(s) have word label(s) 'one' while the other 11 rows' labels are integers: a typo?"
               in s and "(line 2)" in s for s in said), said
    assert any("class '3' has no training rows: its 4 row(s) are in test and val (lines 10, 11, 12, 13)" in s
               for s in said), said
    assert sum(n.startswith("warning: ") for n in report.notes) == 2
