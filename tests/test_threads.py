"""The one thread policy (bench.threads): what it decides, that every way of starting a run
applies it (the threads are read inside the run's training steps), that train.threads
overrides it and is validated, and that the run records and logs what it used."""

from __future__ import annotations

import pytest
import torch

from mmbalance.bench.config import load_config
from mmbalance.bench.launch import launch
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.store import RunDir
from mmbalance.bench.threads import CUDA_THREADS, cpu_share, run_threads
from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import METHODS
from mmbalance.methods.joint import Joint


class ThreadSpy(Joint):
    """Joint training that logs the torch threads its training steps ran with (metrics.jsonl)."""

    def training_step(self, batch):
        self.seen = torch.get_num_threads()
        return super().training_step(batch)

    def epoch_log(self):
        return {"threads": self.seen}


@pytest.fixture
def two_torch_threads():
    """This process at 2 torch threads (as torch's default is on 2 cores), put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def spy_config(fast_config, *overrides):
    return fast_config("method.name=test_thread_spy", "train.epochs=2", "train.device=cpu", *overrides)


def threads_seen(rd: RunDir) -> set[int]:
    return {r["method"]["threads"] for r in rd.read_metrics()}


def test_the_policy_one_thread_on_cpu_the_share_on_an_accelerator_a_number_as_given():
    assert run_threads("auto", "cpu", share=16) == (1, run_threads("auto", "cpu")[1])
    assert run_threads("auto", "cuda", share=3)[0] == 3
    assert run_threads("auto", "cuda", share=64)[0] == CUDA_THREADS
    assert run_threads(4, "cpu") == (4, "train.threads")
    assert run_threads(2, "cuda", share=16)[0] == 2


def test_the_share_is_the_launchers_omp_num_threads_else_the_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_share() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_share() == len(__import__("os").sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-2", "two", "true", "1.5"])
def test_a_bad_train_threads_is_one_line_naming_key_value_and_what_is_allowed(value):
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.threads={value}"])
    line = next(ln for ln in str(error.value).splitlines() if "train.threads" in ln)
    assert "must be a whole number >= 1 or 'auto'" in line and f"from override 'train.threads={value}'" in line


def test_run_applies_the_policy_records_it_and_logs_it(fast_config, store, two_torch_threads, logged):
    """`mmbalance run` and the quickstart's inline runs call bench.train.run."""
    from mmbalance.bench.train import run

    result = run(spy_config(fast_config), store)
    assert threads_seen(RunDir(result.path)) == {1}  # torch's 2 before the run
    assert result.summary["cost"]["threads"] == 1
    assert f"{result.run_id}: cpu, 1 thread(s) (auto: 1 per run on CPU" in logged.read()

    result = run(spy_config(fast_config, "train.threads=2", "train.seed=1"), store)  # threads keep the run id
    assert threads_seen(RunDir(result.path)) == {2} and result.summary["cost"]["threads"] == 2
    assert "2 thread(s) (train.threads)" in logged.read()


def test_an_inline_sweep_applies_the_policy_to_every_run(fast_config, store, two_torch_threads):
    configs = [spy_config(fast_config, f"train.seed={seed}") for seed in (0, 1)]
    configs.append(spy_config(fast_config, "train.seed=2", "train.threads=2"))
    assert launch(configs, store, LauncherConfig(name="inline")) == 0
    seen = [threads_seen(store.run_dir(c.group, c.run_id())) for c in configs]
    assert seen == [{1}, {1}, {2}]


def test_a_worker_process_applies_the_policy_within_its_share(fast_config, store, monkeypatch, two_torch_threads):
    """What a local worker and a SLURM task run (`run-one`), with the share their launcher gave."""
    from mmbalance.bench.launch.worker import run_one

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the launcher's share: the old worker used all of it
    for overrides, expected in (((), 1), (("train.threads=3", "train.seed=1"), 3)):
        cfg = spy_config(fast_config, *overrides)
        rd = store.run_dir(cfg.group, cfg.run_id())
        rd.write_config(cfg.to_dict())
        torch.set_num_threads(2)
        assert run_one(rd.path) == "finished"
        assert threads_seen(rd) == {expected} and rd.read_summary()["cost"]["threads"] == expected


def test_the_local_launcher_runs_one_thread_per_run_and_one_worker_per_core(tmp_path, monkeypatch, logged):
    """Real worker processes: each run records the threads it used; without a GPU the launcher
    starts one worker per core (each run's one thread), and says so."""
    from mmbalance.bench.launch import local
    from mmbalance.bench.store import Store
    from mmbalance.bench.sweep import load_sweep

    monkeypatch.setattr(local, "gpu_count", lambda: 0)
    monkeypatch.setattr(local, "cpu_share", lambda: 2)
    path = tmp_path / "sweep.yaml"
    path.write_text("group: g\nbase:\n  dataset: {name: gaussian}\n"
                    "  train: {epochs: 1, batch_size: 32, progress: false, device: cpu}\n  eval: {probe: false}\n"
                    "seeds: [0, 1]\ncells:\n  joint: {method: {name: joint}}\n")
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    assert launch(configs, store, LauncherConfig(name="local")) == 0
    assert "local: 2 runs on 2 worker process(es) (no GPU), 1 thread(s) each" in logged.read()
    for cfg in configs:
        rd = store.run_dir(cfg.group, cfg.run_id())
        assert rd.read_summary()["cost"]["threads"] == 1
        assert "1 thread(s) (auto: 1 per run on CPU" in (rd.path / "run.log").read_text()


@pytest.fixture(scope="module", autouse=True)
def throwaway_methods():
    """This module's test methods, registered while its tests run only (`init` and the contract
    tests list every registered method)."""
    with METHODS.registered("test_thread_spy", ThreadSpy):
        yield
