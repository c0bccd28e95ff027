"""bench.perf.packing: K concurrent run-one processes of one config, their throughput per K."""

from __future__ import annotations

import math

import pytest

from mmbalance.bench.perf.packing import format_packing, load_measured_config, measure_packing
from mmbalance.core.errors import ConfigError

TINY = """
dataset: {name: gaussian, n_train: 256}
train: {epochs: 2, batch_size: 64}
eval: {probe_c_grid: [1.0]}
"""


def test_a_quick_measurement_gives_positive_finite_numbers_for_each_k(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    rows = measure_packing([1, 2], config, ["optim.lr=0.05"], workdir=tmp_path)
    assert [r["K"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("wall s", "aggregate samples/s", "per-run samples/s", "train-loop aggregate samples/s",
                    "speed-up vs K=1"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["epochs"] == 2 and row["threads/run"] >= 1
    assert rows[0]["speed-up vs K=1"] == 1.0
    assert list(tmp_path.iterdir()) == [config]  # the runs' temporary store is gone
    table = format_packing(rows)
    assert table.splitlines()[0].startswith("|   K |") and "aggregate samples/s" in table
    assert len(table.splitlines()) == 4  # header, rule, one line per K


def test_the_default_is_the_quickstart_joint_concat_run_without_probes():
    cfg = load_measured_config(None, ["train.epochs=3"])
    assert (cfg.label, cfg.dataset["name"], cfg.model.fusion, cfg.method["name"]) == (
        "joint-concat", "avdigits", "concat", "joint")
    assert cfg.train.epochs == 3 and cfg.eval.probe is False


def test_unknown_cells_and_k_values_are_refused(tmp_path):
    from mmbalance.bench.resources import quickstart_config

    with pytest.raises(ConfigError, match="no cell 'joint-cat'.*joint-concat"):
        load_measured_config(quickstart_config(), [], cell="joint-cat")
    with pytest.raises(ConfigError, match="K values >= 1"):
        measure_packing([0, 1])
    with pytest.raises(ConfigError, match="repeats >= 1"):
        measure_packing([1], repeats=0)


def test_repeats_report_the_median_measurement():
    from mmbalance.bench.perf.packing import median_row

    rows = [{"K": 2, "aggregate samples/s": v, "wall s": 100 / v} for v in (30.0, 10.0, 20.0)]
    row = median_row(rows)
    assert row["aggregate samples/s"] == 20.0 and row["wall s"] == 5.0  # one measurement, whole
    assert row["repeats"] == 3 and row["aggregate min..max"] == "10..30"
    assert median_row(rows[:1]) == rows[0]
