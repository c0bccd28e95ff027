"""bench.parallel: a sweep's runs in worker processes give the runs of the one-process loop, and
a run waits for the runs it requires."""

from __future__ import annotations

from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.sweep import run_inline
from tests.conftest import without_timing


def test_workers_train_the_same_runs_and_requirements_first(fast_config, tmp_path):
    # UMT needs the two unimodal runs of its config (bench.requirements): not listed here, planned
    configs = [fast_config("method.name=umt", "train.epochs=2", f"train.seed={seed}", "label=umt") for seed in (0, 1)]
    configs.append(fast_config("method.name=joint", "train.epochs=2", "label=joint"))
    serial = run_inline(configs, Store(tmp_path / "serial"))
    parallel = run_inline(configs, Store(tmp_path / "parallel"), workers=2)
    assert len(serial) == len(parallel) == 7  # 2 umt + 4 unimodal teachers + joint
    by_id = {r.run_id: r for r in parallel}
    for one in serial:
        other = by_id[one.run_id]
        assert other.state == "finished"
        metrics = [without_timing(RunDir(r.path).read_metrics()) for r in (one, other)]
        assert metrics[0] == metrics[1], one.run_id
        assert one.summary["probes"] == other.summary["probes"]
    # each UMT run started after its teachers had finished (their summaries are older than its start)
    for r in parallel:
        if r.summary["method"] == "umt":
            seed = r.summary["seed"]
            teachers = [p for p in parallel if p.summary["method"] == "unimodal" and p.summary["seed"] == seed]
            started = RunDir(r.path).config.stat().st_mtime
            assert len(teachers) == 2
            assert all(RunDir(t.path).summary.stat().st_mtime <= started for t in teachers)
