"""The training loop: determinism, resume, selection, failures, and the store's guarantees."""

from __future__ import annotations

import json
import time

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


class SlowDiagnosis(Joint):
    """Joint training whose epoch hooks take time, as a diagnosis or prototype pass does."""

    def on_epoch_start(self, epoch: int) -> None:
        time.sleep(0.1)

    def on_epoch_end(self, epoch: int) -> None:
        time.sleep(0.2)


def test_a_methods_epoch_hooks_count_in_its_cost(fast_config, store):
    result = run(fast_config("method.name=test_slow_diagnosis"), store)
    history = RunDir(result.path).read_metrics()
    assert all(r["train"]["hook_seconds"] >= 0.3 for r in history)
    assert all(r["train"]["seconds"] < 0.3 for r in history)  # the steps' own time, samples/s's basis
    cost = result.summary["cost"]["seconds_per_epoch"]
    per_epoch = [r["train"]["seconds"] + r["train"]["hook_seconds"] for r in history]
    assert cost == pytest.approx(sum(per_epoch) / len(history))
    assert cost >= 0.3


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


# ---- checkpoint_every and best.pt


def assert_same_run(rd: RunDir, reference: RunDir, summary: dict, ref_summary: dict) -> None:
    """`rd` ended exactly as the uninterrupted `reference`: metrics, reported blocks, probes,
    final parameters and best.pt (epoch and weights)."""
    assert without_timing(rd.read_metrics()) == without_timing(reference.read_metrics())
    for key in ("best_val", "best_test", "last", "probes"):
        assert summary[key] == ref_summary[key], key
    for name in ("checkpoint", "best"):
        final, ref_final = rd.load(getattr(rd, name)), reference.load(getattr(reference, name))
        assert final["epoch"] == ref_final["epoch"], name
        for key, tensor in ref_final["model"].items():
            assert torch.equal(final["model"][key], tensor), (name, key)
    assert not rd.best_next.exists()


def test_checkpoint_every_2_resumes_from_the_last_checkpoint_to_identical_results(fast_config, store, tmp_path,
                                                                                   monkeypatch):
    from mmbalance.bench.store import Store

    cfg = fast_config("train.epochs=5", "train.checkpoint_every=2")
    reference = run(cfg, Store(tmp_path / "ref"))
    assert reference.summary["cost"]["checkpoints"] == 3  # after epochs 1, 3 and the last, 4

    run_interrupted(cfg, store, monkeypatch, at_epoch=3)  # epoch 2 trained, not checkpointed
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert [r["epoch"] for r in rd.read_metrics()] == [0, 1, 2]
    assert rd.load(rd.checkpoint)["epoch"] == 1
    resumed = run(cfg, store)  # drops epoch 2's line and trains it again
    assert resumed.summary["cost"]["checkpoints"] == 2  # 3 and 4, in this process
    assert_same_run(rd, RunDir(reference.path), resumed.summary, reference.summary)


def latest_even_epoch(history, metric, split="val"):
    """A selection rule for the tests below: the latest even epoch, so that the best changes at
    epochs 0, 2, 4 whatever the accuracies (the real rule's choice depends on the data)."""
    return next((r for r in reversed(history) if r["epoch"] % 2 == 0), None)


@pytest.fixture
def best_at_even_epochs(monkeypatch):
    monkeypatch.setattr("mmbalance.bench.train.best_epoch", latest_even_epoch)


def test_a_best_epoch_that_was_not_checkpointed_is_retrained_and_the_checkpoints_best_kept(
        fast_config, store, tmp_path, monkeypatch, best_at_even_epochs):
    """Epoch 2 is the best when the run stops before epoch 3 (checkpoints after 1 and 3): best.pt
    still holds epoch 0, the best of checkpoint.pt's history, for the resume to start from."""
    from mmbalance.bench.store import Store

    cfg = fast_config("train.epochs=5", "train.checkpoint_every=2")
    reference = run(cfg, Store(tmp_path / "ref"))
    assert reference.summary["best_val"]["epoch"] == 4

    run_interrupted(cfg, store, monkeypatch, at_epoch=3)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert rd.load(rd.checkpoint)["epoch"] == 1 and rd.load(rd.best)["epoch"] == 0  # not epoch 2's
    resumed = run(cfg, store)
    assert_same_run(rd, RunDir(reference.path), resumed.summary, reference.summary)


class Crash(KeyboardInterrupt):
    """A kill at a chosen point of a checkpoint write (raised as a Ctrl-C would be)."""


@pytest.mark.parametrize("at", ["before the checkpoint", "between the renames"])
def test_a_crash_while_best_pt_and_checkpoint_pt_are_written_resumes_to_identical_results(
        fast_config, store, tmp_path, monkeypatch, best_at_even_epochs, at):
    """The write after epoch 3 (a new best, epoch 2): best.pt.next, then checkpoint.pt, then the
    rename of best.pt.next over best.pt. Killed after best.pt.next: the resume drops it (it is
    of epochs retrained); killed before the rename: the resume finishes it."""
    import os

    from mmbalance.bench.store import RunDir as Dir
    from mmbalance.bench.store import Store

    cfg = fast_config("train.epochs=5", "train.checkpoint_every=2")
    reference = run(cfg, Store(tmp_path / "ref"))
    save, replace = Dir.save, os.replace

    def save_or_crash(self, path, state):
        if at == "before the checkpoint" and path == self.checkpoint and state["epoch"] == 3:
            raise Crash
        save(self, path, state)

    def replace_or_crash(src, dst):
        if at == "between the renames" and str(src).endswith("best.pt.next"):
            with_epoch = torch.load(src, weights_only=False)["epoch"]
            if with_epoch == 2:
                raise Crash
        replace(src, dst)

    monkeypatch.setattr(Dir, "save", save_or_crash)
    monkeypatch.setattr(os, "replace", replace_or_crash)
    rd = store.run_dir(cfg.group, cfg.run_id())
    with pytest.raises(Crash):
        run(cfg, store)
    monkeypatch.setattr(Dir, "save", save)
    monkeypatch.setattr(os, "replace", replace)
    assert rd.load(rd.best_next)["epoch"] == 2 and rd.load(rd.best)["epoch"] == 0
    assert rd.load(rd.checkpoint)["epoch"] == (1 if at == "before the checkpoint" else 3)

    resumed = run(cfg, store)
    assert_same_run(rd, RunDir(reference.path), resumed.summary, reference.summary)
    assert "damaged" not in rd.status()


def test_a_best_pt_of_another_epoch_than_the_checkpoint_selects_restarts_the_run(fast_config, store, tmp_path,
                                                                               monkeypatch, best_at_even_epochs):
    from mmbalance.bench.store import Store

    cfg = fast_config("train.epochs=5", "train.checkpoint_every=2")
    reference = run(cfg, Store(tmp_path / "ref"))
    run_interrupted(cfg, store, monkeypatch, at_epoch=4)  # checkpoint after 3, which selects epoch 2
    rd = store.run_dir(cfg.group, cfg.run_id())
    rd.save(rd.best, {**rd.load(rd.best), "epoch": 0})
    resumed = run(cfg, store)
    damaged = rd.status()["damaged"]
    assert [(d["file"], d["why"]) for d in damaged] == [
        ("best.pt", "holds epoch 0, not epoch 2, which checkpoint.pt's history selects")]
    assert_same_run(rd, RunDir(reference.path), resumed.summary, reference.summary)


def test_checkpoint_schedule_epochs_seconds_and_auto():
    from mmbalance.bench.train import CHECKPOINT_SHARE, CheckpointSchedule

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731

    every3 = CheckpointSchedule(3, epochs=8, clock=clock)
    assert [e for e in range(8) if every3.due(e)] == [2, 5, 7]  # and always the last

    seconds = CheckpointSchedule("10s", epochs=100, clock=clock)
    now[0] = 9.9
    assert not seconds.due(0)
    now[0] = 10.0
    assert seconds.due(1)
    with seconds.writing():
        now[0] = 12.0  # a 2 s write; the next 10 s count from its end
    now[0] = 21.9
    assert not seconds.due(2)
    assert seconds.due(99)  # the last epoch always
    now[0] = 22.0
    assert seconds.due(3) and (seconds.writes, seconds.write_s) == (1, 2.0)

    now[0] = 0.0
    auto = CheckpointSchedule("auto", epochs=100, clock=clock)
    assert auto.due(0)  # nothing measured yet: the first epoch writes, and measures the write
    with auto.writing():
        now[0] += 1.0
    wait = 1.0 * (1 - CHECKPOINT_SHARE) / CHECKPOINT_SHARE  # 19 s for a 1 s write: 5% of the time
    now[0] = 1.0 + wait - 0.01
    assert not auto.due(1)
    now[0] = 1.0 + wait + 0.01
    assert auto.due(2)


def test_checkpoint_every_auto_writes_the_first_and_last_epochs_and_records_its_writes(fast_config, store):
    result = run(fast_config("train.checkpoint_every=auto", "train.epochs=3"), store)
    cost = result.summary["cost"]
    assert 2 <= cost["checkpoints"] <= 3 and cost["checkpoint_s"] > 0
    rd = RunDir(result.path)
    assert rd.load(rd.checkpoint)["epoch"] == 2


@pytest.mark.parametrize("value", ["0", "-1", "5m", "0s", "-3s", "1.5", "false"])
def test_a_bad_checkpoint_every_is_one_line_naming_key_value_and_what_is_allowed(value):
    from mmbalance.bench.config import load_config
    from mmbalance.core.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.checkpoint_every={value}"])
    line = next(ln for ln in str(error.value).splitlines() if "train.checkpoint_every" in ln)
    assert "must be a number of epochs >= 1, seconds such as '300s' (> 0), or 'auto'" in line
    assert f"from override 'train.checkpoint_every={value}'" in line
    for good, parsed in (("3", 3), ("300s", "300s"), ("2.5s", "2.5s"), ("auto", "auto")):
        assert load_config(None, [f"train.checkpoint_every={good}"]).train.checkpoint_every == parsed


@pytest.fixture(scope="module", autouse=True)
def throwaway_methods():
    """This module's test methods, registered while its tests run only (`init` and the contract
    tests list every registered method)."""
    with (METHODS.registered("test_nan_at_epoch1_batch2", NaNAtEpoch1Batch2), METHODS.registered("test_staged", Staged),
          METHODS.registered("test_slow_diagnosis", SlowDiagnosis)):
        yield
