"""CMU-MOSEI from a MulT pickle in the real layout: prepare, what is cached, the label settings,
bad pickles, and one epoch of three-modality training (joint, AGM; greedy refuses M = 3)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mmbalance.bench.cli import main as cli
from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.cmu_mosei import CmuMosei
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.mult_pickle import SENTIMENTS, write_mosei

MODALITIES = ("audio", "visual", "text")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosei_raw")
    write_mosei(root)  # 10 / 4 / 4 rows, audio 20 x 74, vision 16 x 35, text 12 x 300
    return root


@pytest.fixture(scope="module")
def cache_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "binary"
    return out, prepare("cmu_mosei", raw, out, workers=2, progress=False)


def _pickle(raw):
    with open(raw / "mosei_senti_data_noalign.pkl", "rb") as f:
        return pickle.load(f)


def test_prepare_keeps_the_pickles_split(cache_dir):
    _, report = cache_dir
    assert {s: c["prepared"] for s, c in report.counts.items()} == {"train": 10, "val": 4, "test": 4}
    assert report.split_info["splits"]["train"]["published_count"] == 16326
    assert report.split_info["is_published_split"] is False  # a fixture is not the 22,856 rows
    assert report.missing == {} and report.corrupt == {}


def test_cached_sequences_are_the_pickles_cleaned(raw, cache_dir):
    out, _ = cache_dir
    cache, data = Cache(out), _pickle(raw)
    meta = cache.meta
    assert meta.classes == ["negative", "non-negative"]
    assert meta.kinds == {"audio": "audio", "visual": "video", "text": "text"}
    assert meta.ids[:2] == ["vid000_0.0_5.0", "vid001_1.0_6.0"]
    assert cache.arrays["audio"].shape == (18, 20, 74) and cache.arrays["audio"].dtype == np.float32
    assert cache.arrays["visual"].shape == (18, 16, 35) and cache.arrays["text"].shape == (18, 12, 300)
    rows = [("train", i) for i in range(10)] + [("valid", i) for i in range(4)] + [("test", i) for i in range(4)]
    for row, (split, i) in enumerate(rows):
        audio = data[split]["audio"][i]
        assert np.isneginf(audio).any()  # the fixture holds COVAREP's -inf ...
        want = np.where(np.isneginf(audio), 0, audio).astype(np.float32)  # ... which becomes 0, as in the references
        np.testing.assert_array_equal(cache.arrays["audio"][row], want)
        np.testing.assert_array_equal(cache.arrays["visual"][row], data[split]["vision"][i].astype(np.float32))
        np.testing.assert_array_equal(cache.arrays["text"][row], data[split]["text"][i].astype(np.float32))
        y = float(data[split]["labels"][i, 0, 0])
        assert meta.labels[row] == (0 if y < 0 else 1)  # BalanceBenchmark's acc2: 0.0 is non-negative
    assert 0.0 in SENTIMENTS and meta.labels[3] == 1


def test_views_give_float32_sequences(cache_dir):
    out, _ = cache_dir
    ds = CmuMosei(CmuMosei.Params(root=str(out)))
    assert [(m.name, m.shape) for m in ds.modalities] == [("audio", (20, 74)), ("visual", (16, 35)),
                                                          ("text", (12, 300))]
    batch = ds.split("val").batch([0, 1, 2])
    assert batch.inputs["text"].shape == (3, 12, 300) and np.isfinite(batch.inputs["audio"].numpy()).all()
    assert CmuMosei.default_encoder("audio") == {"name": "seq", "kind": "transformer"}


def test_seven_classes_round_as_mult(raw, tmp_path):
    prepare("cmu_mosei", raw, tmp_path / "seven", "seven", workers=1, progress=False)
    meta = Cache(tmp_path / "seven").meta
    assert meta.classes == ["-3", "-2", "-1", "0", "1", "2", "3"]
    # SENTIMENTS -3, -2.5, -0.5, 0, 0.4, 1.5, 2.5, 3.4, -1.2, 0.6: halves round to even, 3.4 clips to 3
    assert meta.labels[:10] == [0, 1, 3, 3, 3, 5, 5, 6, 2, 4]


def test_aligned_pipeline_reads_the_aligned_pickle(raw, tmp_path):
    with pytest.raises(DataError, match="mosei_senti_data.pkl' does not exist.*found mosei_senti_data_noalign.pkl"):
        prepare("cmu_mosei", raw, tmp_path / "a", "binary_aligned", progress=False)
    write_mosei(tmp_path / "aligned", aligned=True)
    prepare("cmu_mosei", tmp_path / "aligned", tmp_path / "a", "binary_aligned", workers=1, progress=False)
    assert Cache(tmp_path / "a").arrays["audio"].shape == (18, 12, 74)  # every modality at the words' steps
    # --raw may name the pickle itself
    prepare("cmu_mosei", raw / "mosei_senti_data_noalign.pkl", tmp_path / "f", workers=1, progress=False)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d.pop("valid"), r"has no split key 'valid' \(it has 'train', 'test'\)"),
    (lambda d: d["test"].pop("vision"), r"\['test'\] has no key 'vision'"),
    (lambda d: d["train"].update(audio=d["train"]["audio"][:, 0]), r"\['train'\]\['audio'\] is ndarray of shape "
                                                                   r"\(10, 74\); expected a numeric array \(N, T, D\)"),
    (lambda d: d["train"].update(labels=d["train"]["labels"][:3]), r"\['train'\]\['audio'\] has 10 rows, 'labels' 3"),
])
def test_damaged_pickles_are_named(raw, tmp_path, damage, message):
    data = _pickle(raw)
    damage(data)
    with open(tmp_path / "mosei_senti_data_noalign.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DataError, match=message):
        prepare("cmu_mosei", tmp_path, tmp_path / "out", progress=False)


def test_not_a_pickle(tmp_path):
    (tmp_path / "mosei_senti_data_noalign.pkl").write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match="is not a readable pickle"):
        prepare("cmu_mosei", tmp_path, tmp_path / "out", progress=False)


def run(tmp_path, root, method: str, *extra: str) -> int:
    config = tmp_path / f"{method}.yaml"
    config.write_text(f"dataset: {{name: cmu_mosei, root: {root}}}\n")
    return cli(["--results", str(tmp_path / "results"), "run", str(config), f"method.name={method}",
                "train.epochs=1", "train.batch_size=4", "train.progress=false", "eval.probe_c_grid=[1.0]", *extra])


@pytest.mark.parametrize("method", ["joint", "agm"])
def test_one_epoch_with_three_modalities(cache_dir, tmp_path, capsys, method):
    out, _ = cache_dir
    assert run(tmp_path, out, method) == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


def test_a_two_modality_method_refuses_three(cache_dir, tmp_path, capsys):
    out, _ = cache_dir
    assert run(tmp_path, out, "greedy") == 2
    err = capsys.readouterr().err
    assert "greedy" in err and "exactly 2 modalities" in err and "Traceback" not in err
