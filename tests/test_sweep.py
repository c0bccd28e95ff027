"""Sweep files: expansion into labelled, seeded run configs, and errors that name the cell."""

from __future__ import annotations

import pytest

from bench.errors import ConfigError
from bench.sweep import is_sweep_file, load_sweep

SWEEP = """
group: demo
base:
  dataset: {name: gaussian}
  train: {epochs: 2}
seeds: [0, 1]
cells:
  concat: {method.name: joint, model.fusion: concat}
  visual-only: {method.name: unimodal, method.modality: visual}
"""


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_cells_times_seeds_with_labels_and_group(tmp_path):
    path = write(tmp_path, SWEEP)
    assert is_sweep_file(path)
    sweep, configs = load_sweep(path, ["train.epochs=3"])
    assert [(c.label, c.train.seed) for c in configs] == [
        ("concat", 0), ("concat", 1), ("visual-only", 0), ("visual-only", 1)]
    assert {c.group for c in configs} == {"demo"}
    assert {c.train.epochs for c in configs} == {3}  # overrides apply over base and cells
    assert configs[2].method == {"name": "unimodal", "modality": "visual"}
    assert len({c.run_id() for c in configs}) == 4


def test_a_bad_key_in_a_cell_names_the_cell(tmp_path):
    path = write(tmp_path, SWEEP.replace("model.fusion: concat", "model.fusoin: concat"))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "model.fusoin" in msg and "cell 'concat'" in msg and str(path) in msg and "fusion" in msg


def test_a_sweep_needs_cells(tmp_path):
    path = write(tmp_path, "group: demo\ncells: {}\n")
    with pytest.raises(ConfigError, match="cells"):
        load_sweep(path)


def test_a_cell_the_method_rejects_stops_the_sweep_before_any_run(tmp_path):
    from bench.store import Store
    from bench.sweep import run_inline

    path = write(tmp_path, SWEEP + "  mie-too-long: {method.name: mie, method.epoch_list: [5, 5]}\n")
    _, configs = load_sweep(path)
    store = Store(tmp_path / "results")
    with pytest.raises(ConfigError, match="cell 'mie-too-long'.*10.*2"):
        run_inline(configs, store)
    assert not store.root.exists()
