"""Live tracking (bench.tracking): TensorBoard events hold exactly metrics.jsonl's numbers, a resumed
run's events hold each epoch once, sweeps track by default without changing run ids, and trackers that
are asked for but not installed stop the run in one line."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmbalance.bench.config import load_config
from mmbalance.bench.store import RunDir
from mmbalance.bench.sweep import load_sweep, run_inline
from mmbalance.bench.tracking import TB_DIR, open_trackers, scalars
from mmbalance.bench.train import run
from mmbalance.core.errors import ConfigError, RunFailed
from tests.conftest import run_interrupted


def events(run_path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag of the run's one TensorBoard run directory: its (step, value) pairs, as
    TensorBoard reads them (restarts purged)."""
    runs = list((run_path / TB_DIR).iterdir())
    assert len(runs) == 1, runs
    accumulator = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers per tag, as float32 (what an event holds)."""
    found: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for tag, value in scalars(record):
            found.setdefault(tag, []).append((record["epoch"], float(np.float32(value))))
    return found


def test_events_hold_every_number_of_metrics_jsonl(fast_config, store):
    # InfoReg: step diagnostics in `train`, epoch_log() in `method`
    cfg = fast_config("method.name=inforeg", "train.epochs=2", "train.tensorboard=true")
    result = run(cfg, store)
    history = RunDir(result.path).read_metrics()
    logged = events(RunDir(result.path).path)
    assert logged == expected(history)
    assert {"lr", "train/loss", "val/acc", "test/acc", "val/modality_acc/audio", "val/modality_acc/visual",
            "method/acquisition_rate"} <= logged.keys()
    assert (RunDir(result.path).path / TB_DIR / "inforeg,seed=0").is_dir()  # label and seed, readable


def test_no_events_unless_asked(fast_config, store):
    result = run(fast_config("train.epochs=1"), store)
    assert not (RunDir(result.path).path / TB_DIR).exists()


@pytest.mark.parametrize("first_tracked", [True, False])
def test_a_resumed_run_logs_each_epoch_once(fast_config, store, monkeypatch, first_tracked):
    """Epochs 0-2 trained, the checkpoint after epoch 1: the resume retrains epoch 2. Whether the
    interrupted process tracked or not (the key is not in the run id), the events hold epochs 0-3 once."""
    cfg = fast_config("train.checkpoint_every=2", "train.tensorboard=true")
    first = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tensorboard": first_tracked})})
    assert first.run_id() == cfg.run_id()
    run_interrupted(first, store, monkeypatch, at_epoch=3)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert (rd.path / TB_DIR).exists() == first_tracked
    run(cfg, store)
    logged = events(rd.path)
    assert all([step for step, _ in pairs] == [0, 1, 2, 3] for pairs in logged.values()), logged["train/loss"]
    assert logged == expected(rd.read_metrics())


SWEEP = """
group: tracked
base: {dataset: {name: gaussian}, train: {epochs: 1, progress: false}, eval: {probe: false}}
cells:
  joint: {method: {name: joint}}
grid:
  model.fusion: [concat, sum]
"""


def test_sweeps_track_by_default_and_keep_their_run_ids(tmp_path, store):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    _, configs = load_sweep(path)
    assert [c.train.tensorboard for c in configs] == [True, True]
    single = load_config(None, ["dataset.name=gaussian", "train.epochs=1", "model.fusion=concat", "eval.probe=false"])
    assert single.train.tensorboard is False
    assert single.run_id() == configs[0].run_id()
    results = run_inline(configs[:1], store)
    assert (RunDir(results[0].path).path / TB_DIR / "joint,fusion=concat,seed=0").is_dir()
    # the sweep's file or an override says otherwise
    _, off = load_sweep(path, ["train.tensorboard=false"])
    path.write_text(SWEEP.replace("progress: false}", "progress: false, tensorboard: false}"))
    _, off_in_file = load_sweep(path)
    assert [c.train.tensorboard for c in off + off_in_file] == [False] * 4
    assert [c.run_id() for c in off] == [c.run_id() for c in configs]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_not_installed_stops_the_run_in_one_line(fast_config, store, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # importing it raises ImportError
    cfg = fast_config("train.epochs=1", f"train.tracking=[{tracker}]")
    with pytest.raises(ConfigError) as error:
        open_trackers(cfg, store.run_dir(cfg.group, cfg.run_id()), [])
    message = str(error.value)
    assert "\n" not in message and f"train.tracking lists {tracker}" in message and "pip install" in message
    with pytest.raises(RunFailed, match=f"train.tracking lists {tracker}, but {tracker} is not installed"):
        run(cfg, store)
    # a sweep stops before any run starts
    other = fast_config("train.epochs=1", f"train.tracking=[{tracker}]", "train.seed=1")
    with pytest.raises(ConfigError, match=f"train.tracking lists {tracker}"):
        run_inline([other], store)
    assert not store.run_dir(other.group, other.run_id()).path.exists()


def test_wandb_and_mlflow_get_the_same_scalars(fast_config, store, monkeypatch):
    """Stand-ins for the two packages record what the trackers send them: each epoch's scalars."""
    sent: dict[str, list] = {"wandb": [], "mlflow": []}
    finished: list[str] = []

    class WandbRun:
        def log(self, data, step):
            sent["wandb"].append((step, data))

        def finish(self):
            finished.append("wandb")

    wandb = types.SimpleNamespace(init=lambda **kw: WandbRun())
    mlflow = types.SimpleNamespace(
        start_run=lambda **kw: types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1")),
        log_metrics=lambda metrics, step, run_id: sent["mlflow"].append((step, metrics)),
        end_run=lambda: finished.append("mlflow"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    result = run(fast_config("train.epochs=2", "train.tracking=[wandb,mlflow]"), store)
    history = RunDir(result.path).read_metrics()
    assert sent["mlflow"] == [(r["epoch"], dict(scalars(r))) for r in history]
    assert sent["wandb"] == [(r["epoch"], {**dict(scalars(r)), "epoch": r["epoch"]}) for r in history]
    assert finished == ["wandb", "mlflow"]
