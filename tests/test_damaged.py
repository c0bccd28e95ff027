"""Damaged files in the results store (issue 13, items 2 and 3): each file kind of a run damaged in
each way (empty, truncated, garbage bytes, parseable but forged values) is named in one line by
`status` (which goes on with the other runs), left out and listed by `report`, planned by
`sweep --dry-run`, and repaired by launching again: a damaged checkpoint.pt or best.pt restarts
the run from scratch, damaged records resume it from its checkpoint; either way the damaged file
is kept aside and listed in status.json, and the run ends with the metrics of an undamaged run."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mmbalance.bench.cli import main as cli
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.sweep import load_sweep
from mmbalance.bench.train import Trainer, run
from mmbalance.core.errors import DamagedFile
from tests.conftest import run_interrupted, without_timing

SWEEP = """
group: dmg
base:
  dataset: {name: gaussian}
  train: {epochs: 3, batch_size: 32, progress: false, checkpoint_every: 1}
  optim: {lr: 0.05}
  eval: {probe_c_grid: [1.0]}
seeds: [0, 1]
cells:
  joint: {method: {name: joint}}
launcher: {name: inline}
"""
GARBAGE = b"\x89\xfe\x00\xffgarbage\x80" * 8
RECORDS = ("status.json", "config.yaml", "metrics.jsonl", "summary.json")
CHECKPOINTS = ("checkpoint.pt", "best.pt")
WAYS = ("empty", "truncated", "garbage", "forged")


@dataclass
class World:
    root: Path
    sweep: Path
    store: Store
    finished: RunDir  # seed 0, trained to the end
    unfinished: RunDir  # seed 1, interrupted as its last epoch (2) started
    reference: list[dict]  # seed 1's metrics when nothing is damaged

    @property
    def group(self) -> Path:
        return self.store.root / "dmg"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("pristine")
    (root / "sweep.yaml").write_text(SWEEP)
    _, (finished, unfinished) = load_sweep(root / "sweep.yaml")
    store = Store(root / "results")
    run(finished, store)
    with pytest.MonkeyPatch.context() as mp:
        run_interrupted(unfinished, store, mp, at_epoch=2)
    reference = Store(tmp_path_factory.mktemp("reference"))
    run(unfinished, reference)
    return World(root, root / "sweep.yaml", store, store.run_dir("dmg", finished.run_id()),
                 store.run_dir("dmg", unfinished.run_id()),
                 without_timing(reference.run_dir("dmg", unfinished.run_id()).read_metrics()))


@pytest.fixture
def world(pristine, tmp_path) -> World:
    """A copy of the pristine store for one case."""
    shutil.copytree(pristine.root, tmp_path / "w")
    store = Store(tmp_path / "w" / "results")
    return World(tmp_path / "w", tmp_path / "w" / "sweep.yaml", store,
                 store.run_dir("dmg", pristine.finished.run_id), store.run_dir("dmg", pristine.unfinished.run_id),
                 pristine.reference)


def forge(path: Path) -> None:
    """Parseable, with a value no run can have."""
    if path.suffix == ".pt":
        state = torch.load(path, weights_only=False)
        state["epoch"] = 99  # of 3
        torch.save(state, path)
    elif path.name == "config.yaml":
        cfg = yaml.safe_load(path.read_text())
        cfg["train"]["epochs"] = -3
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    elif path.name == "metrics.jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records[0]["val"]["acc"] = 9.5
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        data = json.loads(path.read_text())
        if path.name == "summary.json":
            data["best_val"]["test"]["acc"] = 9.5
        else:
            data["epochs_done"] = -1
        path.write_text(json.dumps(data))


def damage(path: Path, way: str) -> bytes:
    """Damage `path` in `way`; returns the damaged bytes."""
    data = path.read_bytes()
    if way == "empty":
        path.write_bytes(b"")
    elif way == "truncated":  # two thirds, then back to 3 bytes into that line: a YAML file cut at
        cut = data.rfind(b"\n", 0, len(data) * 2 // 3) + 4  # a value's end can still parse
        path.write_bytes(data[:cut])
    elif way == "garbage":
        path.write_bytes(GARBAGE)
    else:
        forge(path)
    return path.read_bytes()


def why(name: str, way: str) -> str:
    """What the one-line message says is wrong."""
    if way == "empty":
        return "empty"
    if way == "forged":
        return "value out of range"
    if name.endswith(".pt"):
        return "PyTorch checkpoint"
    if way == "garbage":
        return "not UTF-8"
    return {"config.yaml": "not YAML", "metrics.jsonl": "not JSON"}.get(name, "not JSON")


def target(w: World, name: str) -> RunDir:
    # summary.json exists only once a run has finished; the other kinds are damaged in the run
    # that still has an epoch to train (a relaunch must resume or restart it)
    return w.finished if name == "summary.json" else w.unfinished


def line_of(out: str, run_id: str) -> str:
    return next(line for line in out.splitlines() if run_id in line)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("name", RECORDS + CHECKPOINTS)
def test_a_damaged_file_is_named_in_status_report_and_plan_and_a_relaunch_repairs_it(world, name, way, capsys,
                                                                                    monkeypatch, tmp_path):
    rd, other = target(world, name), ({world.finished, world.unfinished} - {target(world, name)}).pop()
    before = {"summary": world.finished.read_summary(), "other": other.read_metrics()}
    damaged = damage(rd.path / name, way)
    record = name in RECORDS
    # a forged checkpoint is a valid archive: only loading it (the relaunch) tells
    seen = not (name in CHECKPOINTS and way == "forged")

    assert cli(["status", str(world.group)]) == 0
    out = capsys.readouterr().out
    assert line_of(out, other.run_id).count("|") == line_of(out, rd.run_id).count("|")  # the others go on
    assert ("finished" if other is world.finished else "interrupted") in line_of(out, other.run_id)
    if seen:
        assert f"damaged ({name}: " in line_of(out, rd.run_id) and why(name, way) in line_of(out, rd.run_id)
        listed = line_of(out, f"{rd.path / name}: ")  # the full path, in the list below the table
        assert why(name, way) in listed and listed.strip().startswith(f"dmg/{rd.run_id} (")

    assert cli(["report", str(world.group), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    runs_csv = (tmp_path / "report" / "runs.csv").read_text()
    assert other.run_id in runs_csv
    if record:
        assert why(name, way) in line_of(out, f"dmg/{rd.run_id}: {name}: ")
        assert "left out 1 run(s) with damaged files" in out
        assert rd.run_id not in runs_csv and rd.run_id in (tmp_path / "report" / "damaged.csv").read_text()
        assert rd.run_id in (tmp_path / "report" / "README.md").read_text()
    else:
        assert rd.run_id in runs_csv and "with damaged files" not in out

    assert cli(["--results", str(world.store.root), "sweep", str(world.sweep), "--dry-run"]) == 0
    planned = line_of(capsys.readouterr().out, rd.run_id)
    if seen:
        assert f"(damaged {name}: " in planned and why(name, way) in planned
    assert planned.split(f"{rd.run_id}  ")[1].startswith("new" if name in CHECKPOINTS and seen else "resume")

    trained = []
    original = Trainer.train_epoch
    monkeypatch.setattr(Trainer, "train_epoch",
                        lambda self, epoch: trained.append((self.dir.run_id, epoch)) or original(self, epoch))
    assert cli(["--results", str(world.store.root), "sweep", str(world.sweep)]) == 0
    capsys.readouterr()
    assert rd.done() and other.done() and rd.damage() is None
    # a damaged checkpoint restarts from scratch; damaged records resume from the checkpoint
    assert [e for run_id, e in trained if run_id == rd.run_id] == (
        [0, 1, 2] if not record else [] if rd is world.finished else [2])
    [entry] = rd.status()["damaged"]
    assert entry["file"] == name and why(name, way) in entry["why"]
    assert entry["kept_as"].startswith(f"{name}.damaged-") and (rd.path / entry["kept_as"]).read_bytes() == damaged
    if rd is world.unfinished:
        assert without_timing(rd.read_metrics()) == world.reference
    else:
        summary = rd.read_summary()
        assert {k: summary[k] for k in ("best_val", "best_test", "last", "probes")} == \
            {k: before["summary"][k] for k in ("best_val", "best_test", "last", "probes")}
    assert other.read_metrics()[: len(before["other"])] == before["other"]
    assert cli(["status", str(world.group)]) == 0 and "damaged (" not in capsys.readouterr().out


@pytest.mark.parametrize("way", WAYS)
def test_run_one_with_a_damaged_config_is_one_line_naming_it(world, way, capsys):
    damage(world.unfinished.config, way)
    assert cli(["run-one", str(world.unfinished.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {world.unfinished.config}: {why('config.yaml', way)}")


def test_the_local_launcher_rewrites_a_damaged_config_and_status(world, capsys):
    damage(world.unfinished.config, "garbage")
    damage(world.unfinished.status_file, "truncated")
    assert cli(["--results", str(world.store.root), "sweep", str(world.sweep), "--launcher", "local"]) == 0
    assert world.unfinished.done()
    assert without_timing(world.unfinished.read_metrics()) == world.reference
    assert sorted(d["file"] for d in world.unfinished.status()["damaged"]) == ["status.json"]


def test_readers_name_the_file_line_and_rule(tmp_path):
    rd = RunDir(tmp_path / "g" / "r")
    rd.path.mkdir(parents=True)
    good = {"epoch": 0, "train": {"loss": 1.0}, "val": {"acc": 0.5}, "test": {"acc": 0.5}}
    cases = [
        ('{"epoch": 0}\n', "line 1: wrong shape: val is missing"),
        (json.dumps(good) + "\n" + json.dumps({**good, "epoch": 2}) + "\n",
         "line 2: epochs out of order: epoch 2 where 1 was expected"),
        (json.dumps(good) + "\n" + json.dumps({**good, "epoch": 1, "test": {"acc": "0.5"}}) + "\n",
         "line 2: wrong shape: test.acc is '0.5'"),
        (json.dumps(good) + "\n{\"epoch\": NaN}\n", "not JSON at line 2: NaN is not strict JSON"),
        (json.dumps(good) + "\n" + json.dumps({**good, "epoch": 1, "val": {"acc": -0.1}}) + "\n",
         "line 2: value out of range: val.acc is -0.1"),
    ]
    for text, message in cases:
        rd.metrics.write_text(text)
        with pytest.raises(DamagedFile) as e:
            rd.read_metrics()
        assert str(e.value).startswith(f"{rd.metrics}: {message}"), str(e.value)
    rd.status_file.write_text('{"state": "runing"}')
    with pytest.raises(DamagedFile, match="state is 'runing', not one of pending, running"):
        rd.status()
    assert rd.recorded_status()["state"] == "damaged"


def test_the_writer_refuses_what_the_readers_would_call_damaged(tmp_path):
    """status, metrics and summary are checked against the readers' schema before they are
    written: a record no reader accepts is an error naming the file and the field, and the file
    keeps what it held."""
    from mmbalance.core.errors import StoreError

    rd = Store(tmp_path).run_dir("g", "r")
    rd.set_status("running", epochs=3, epochs_done=1)
    with pytest.raises(StoreError, match=r"status.json: value out of range: epochs_done 5 > epochs 3"):
        rd.set_status("running", epochs=3, epochs_done=5)
    assert rd.status()["epochs_done"] == 1
    good = {"epoch": 0, "train": {"loss": 1.0}, "val": {"acc": 0.5}, "test": {"acc": 0.4}}
    rd.write_metrics([good])
    with pytest.raises(StoreError, match=r"metrics.jsonl: line 2: value out of range: val.acc is 1.5"):
        rd.write_metrics([good, {**good, "epoch": 1, "val": {"acc": 1.5}}])
    assert rd.read_metrics() == [good]
    with pytest.raises(StoreError, match=r"summary.json: wrong shape: .* is missing"):
        rd.write_summary({"epochs": 1})
    assert not rd.summary.exists()
