"""The training loop: determinism, resume, selection, failures, and the store's guarantees."""

from __future__ import annotations

import json

import pytest
import torch

from mmbalance.bench.store import RunDir, atomic_write_text
from mmbalance.bench.train import run
from mmbalance.core.errors import RunFailed
from mmbalance.core.registry import METHODS
from mmbalance.methods.joint import Joint
from tests.conftest import run_interrupted, without_timing


def test_same_seed_gives_identical_metrics(fast_config, tmp_path):
    from mmbalance.bench.store import Store

    cfg = fast_config("method.name=joint", "model.fusion=gated")
    a = run(cfg, Store(tmp_path / "a"))
    b = run(cfg, Store(tmp_path / "b"))
    ma = RunDir(a.path).read_metrics()
    mb = RunDir(b.path).read_metrics()
    assert len(ma) == 4
    assert without_timing(ma) == without_timing(mb)
    assert a.summary["probes"] == b.summary["probes"]
    other = run(fast_config("method.name=joint", "model.fusion=gated", "train.seed=1"), Store(tmp_path / "c"))
    assert without_timing(RunDir(other.path).read_metrics()) != without_timing(ma)


def test_interrupted_run_resumes_to_identical_metrics(fast_config, store, tmp_path, monkeypatch):
    from mmbalance.bench.store import Store

    cfg = fast_config("method.name=joint", "model.fusion=film")
    reference = run(cfg, Store(tmp_path / "ref"))

    run_interrupted(cfg, store, monkeypatch, at_epoch=2)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert rd.status()["state"] == "interrupted"
    assert [r["epoch"] for r in rd.read_metrics()] == [0, 1]
    assert rd.load(rd.checkpoint)["epoch"] == 1

    resumed = run(cfg, store)
    assert resumed.state == "finished"
    assert without_timing(rd.read_metrics()) == without_timing(RunDir(reference.path).read_metrics())
    for key in ("best_val", "best_test", "last", "probes"):
        assert resumed.summary[key] == reference.summary[key]
    final, ref_final = rd.load(rd.checkpoint), RunDir(reference.path).load(RunDir(reference.path).checkpoint)
    for name, tensor in ref_final["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    # counters survive the resume, so the cost is per step of the whole run
    assert resumed.summary["cost"]["forward_passes_per_step"] == 1.0
    assert resumed.summary["cost"]["backward_passes_per_step"] == 1.0


def test_finished_run_is_skipped(fast_config, store):
    cfg = fast_config()
    first = run(cfg, store)
    mtime = (store.run_dir(cfg.group, cfg.run_id()).metrics).stat().st_mtime_ns
    second = run(cfg, store)
    assert (first.state, second.state) == ("finished", "skipped")
    assert second.summary == first.summary
    assert store.run_dir(cfg.group, cfg.run_id()).metrics.stat().st_mtime_ns == mtime


def test_selection_on_val_and_labelled_alternatives(fast_config, store):
    result = run(fast_config("train.epochs=6"), store)
    history = RunDir(result.path).read_metrics()
    best_val_epoch = max(range(len(history)), key=lambda e: history[e]["val"]["acc"])
    best_test_epoch = max(range(len(history)), key=lambda e: history[e]["test"]["acc"])
    s = result.summary
    assert s["best_val"]["epoch"] == best_val_epoch
    assert s["best_val"]["test"] == history[best_val_epoch]["test"]
    assert s["best_test"]["epoch"] == best_test_epoch and "test" in s["best_test"]["note"]
    assert s["last"]["epoch"] == 5
    # probes run on the best-val weights
    assert RunDir(result.path).load(RunDir(result.path).best)["epoch"] == best_val_epoch


def test_cost_and_metrics_are_recorded(fast_config, store):
    s = run(fast_config("method.name=unimodal", "method.modality=visual"), store).summary
    cost = s["cost"]
    assert cost["forward_passes_per_step"] == 1.0 and cost["backward_passes_per_step"] == 1.0
    assert cost["seconds_per_epoch"] > 0 and cost["samples_per_s"] > 0
    assert "peak_rss_mb" in cost or "peak_gpu_mem_mb" in cost
    assert set(s["probes"]) == {"visual"}
    assert set(s["best_val"]["test"]["modality_acc"]) == {"visual"}
    for key in ("acc", "macro_f1", "map", "loss"):
        assert 0 <= s["best_val"]["test"][key] or key == "loss"


@METHODS.register("test_nan_at_epoch1_batch2")
class NaNAtEpoch1Batch2(Joint):
    """Joint training whose loss turns NaN at epoch 1, batch 2 (for the failure test)."""

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def training_step(self, batch):
        out = super().training_step(batch)
        if (self.epoch, self.batch) == (1, 2):
            out["loss"] = torch.tensor(float("nan"))
        self.batch += 1
        return out


def test_nan_loss_fails_the_run_and_keeps_what_was_recorded(fast_config, store):
    cfg = fast_config("method.name=test_nan_at_epoch1_batch2")
    with pytest.raises(RunFailed, match=r"epoch 1, batch 2"):
        run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    status = rd.status()
    assert status["state"] == "failed"
    assert (status["epoch"], status["batch"]) == (1, 2)
    assert "nan" in status["error"]
    assert [r["epoch"] for r in rd.read_metrics()] == [0]
    assert rd.load(rd.checkpoint)["epoch"] == 0
    assert rd.config.exists() and not rd.summary.exists()


def test_empty_split_fails_with_its_name(fast_config, store):
    cfg = fast_config("dataset.n_val=0")
    with pytest.raises(RunFailed, match="split 'val' is empty"):
        run(cfg, store)
    assert store.run_dir(cfg.group, cfg.run_id()).status()["state"] == "failed"


def test_missing_data_file_fails_naming_it(store, tmp_path):
    from mmbalance.bench.config import load_config

    missing = tmp_path / "nowhere" / "avdigits.npz"
    cfg = load_config(None, [f"dataset.cache={missing}", "train.epochs=1", "train.progress=false"])
    with pytest.raises(RunFailed, match="nowhere"):
        run(cfg, store)
    status = store.run_dir(cfg.group, cfg.run_id()).status()
    assert status["state"] == "failed" and str(missing) in status["error"]


def test_require_dir_names_key_and_path(tmp_path):
    from mmbalance.core.errors import DataError
    from mmbalance.datasets.base import require_dir

    with pytest.raises(DataError, match="set dataset.root="):
        require_dir(None, "cremad")
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        require_dir(tmp_path / "absent", "cremad")
    assert require_dir(tmp_path, "cremad") == tmp_path


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, json.dumps({"ok": 1}))

    class Boom(Exception):
        pass

    from mmbalance.bench.store import atomic_write

    def half_then_fail(f):
        f.write('{"half":')
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


def test_status_marks_a_killed_run_stale(fast_config, store, tmp_path):
    import subprocess
    import sys

    from mmbalance.bench.claim import try_claim
    from mmbalance.bench.status import shown_state, status_table

    cfg = fast_config()
    run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rd.set_status("running", epoch=2, epochs=4)
    record = {**rd.status(), "pid": dead.pid}
    assert shown_state(record) == "running (stale: process gone)"
    # liveness is the claim, not the pid: this process is alive but trains nothing
    assert shown_state(rd.status()) == "running (stale: process gone)"
    with try_claim(rd):
        assert shown_state(rd.status(), held=True) == "running"
        table = status_table(store.root / cfg.group)
        assert "1 running" in table and "stale" not in table


@METHODS.register("test_staged")
class Staged(Joint):
    """Joint training with a 'stage 2' from epoch 2 on: a fresh optimizer at the boundary, only
    stage-2 epochs selectable, and a record of what the hooks saw."""

    def __init__(self, params, setup):
        super().__init__(params, setup)
        self.seen_val: list[int] = []
        self.train_pass_sizes: list[int] = []

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 2:
            self.step_context.reset_optimizer()
            self.train_pass_sizes.append(sum(len(b) for b in self.step_context.train_batches()))

    def on_validation_end(self, epoch, metrics):
        assert "acc" in metrics
        self.seen_val.append(epoch)

    def epoch_log(self):
        return {"stage": 2 if self.step_context.epoch >= 2 else 1, "batches": self.step_context.num_batches}

    def selectable(self, epoch: int) -> bool:
        return epoch >= 2


def test_staged_method_hooks_selection_and_resume(fast_config, store, tmp_path, monkeypatch):
    from mmbalance.bench.store import Store

    cfg = fast_config("method.name=test_staged")
    reference = run(cfg, Store(tmp_path / "ref"))
    history = RunDir(reference.path).read_metrics()
    assert [r["method"] for r in history] == [{"stage": s, "batches": 4} for s in (1, 1, 2, 2)]
    assert [r["selectable"] for r in history] == [False, False, True, True]
    assert reference.summary["best_val"]["epoch"] >= 2 and reference.summary["best_test"]["epoch"] >= 2
    # the fresh optimizer restarts the schedule: epoch 2 runs at the base lr again (StepLR(2) had decayed it)
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.05, 0.05, 0.05])

    # interrupted right after the boundary, resumed: identical to the uninterrupted run
    run_interrupted(cfg, store, monkeypatch, at_epoch=3)
    resumed = run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert without_timing(rd.read_metrics()) == without_timing(history)
    assert resumed.summary["probes"] == reference.summary["probes"]


def test_a_config_the_method_rejects_writes_nothing(fast_config, store):
    from mmbalance.core.errors import ConfigError

    cfg = fast_config("method.name=unimodal", "method.modality=audoi")
    with pytest.raises(ConfigError, match="audoi"):
        run(cfg, store)
    assert not store.root.exists()


@pytest.mark.parametrize("lazy", [False, True])
def test_loss_tally_means_and_first_non_finite_batch(lazy):
    """The epoch's loss means, and the first bad batch of any key, whether the tally reads each
    step's values at once (CPU) or keeps them on the device until the epoch ends (accelerators)."""
    from mmbalance.bench.train import LossTally, NonFiniteLoss

    tally = LossTally(lazy=lazy)
    tally.add({"loss": torch.tensor(1.0), "lam": 0.5}, n=2, index=0)
    tally.add({"loss": torch.tensor(4.0), "lam": 1.0}, n=1, index=1)
    assert tally.means() == {"loss": 2.0, "lam": 2 / 3}  # (1*2 + 4*1) / 3 and (0.5*2 + 1) / 3
    tally.check(epoch=0)  # all finite: nothing raised
    tally.add({"loss": torch.tensor(float("inf")), "lam": 1.0}, n=1, index=2)
    tally.add({"loss": torch.tensor(2.0), "lam": float("nan")}, n=1, index=3)
    with pytest.raises(NonFiniteLoss, match=r"loss 'loss' became inf at epoch 4, batch 2"):
        tally.check(epoch=4)


@pytest.mark.slow
def test_compiled_encoders_train_like_eager_ones(fast_config, tmp_path):
    """train.compile keeps the run id and, up to float reassociation, the numbers (slow: Inductor
    compiles C++ on a CPU)."""
    from mmbalance.bench.store import Store

    eager, compiled = fast_config(), fast_config("train.compile=true")
    assert eager.run_id() == compiled.run_id()
    a = run(eager, Store(tmp_path / "eager"))
    b = run(compiled, Store(tmp_path / "compiled"))
    for key in ("acc", "loss"):
        assert b.summary["last"]["val"][key] == pytest.approx(a.summary["last"]["val"][key], abs=0.02)
