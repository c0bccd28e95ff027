"""ModelNet40 front/rear views: prepare from a fixture download, which views were cached, the
views' tensors, missing/corrupt renders, and one epoch of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.modelnet40 import ModelNet40, Modelnet40Params
from mmbalance.datasets.prepare.runner import prepare
from mmbalance.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.fixtures.modelnet40 import CLASSES, view_colour, view_path, write_modelnet40
from tests.fixtures.train import train_one_epoch


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("modelnet_raw")
    return root, write_modelnet40(root)  # 3 classes x (3 train + 2 test) objects x 12 views


@pytest.fixture(scope="module")
def cache_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "dimml"
    return out, prepare("modelnet40", raw[0], out, workers=2, progress=False)


def test_prepare_counts_and_report(cache_dir):
    out, report = cache_dir
    # 9 train objects: 2 carved for validation (20% of 9, rounded; per class by largest remainder)
    assert report.counts["train"] == {"listed": 7, "prepared": 7, "missing": 0, "corrupt": 0}
    assert report.counts["val"] == {"listed": 2, "prepared": 2, "missing": 0, "corrupt": 0}
    assert report.counts["test"] == {"listed": 6, "prepared": 6, "missing": 0, "corrupt": 0}
    assert report.split_info["splits"]["train"]["published_count"] == 7874
    assert report.split_info["is_published_split"] is False
    assert report.notes == ["3 class folders found (ModelNet40 has 40)"]


def test_front_is_v001_and_rear_is_v007(raw, cache_dir):
    out, _ = cache_dir
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == list(CLASSES)
    front, rear = cache.arrays["front"], cache.arrays["rear"]
    assert front.shape == (15, 1, 224, 224, 3) and front.dtype == np.uint8
    assert rear.shape == (15, 1, 224, 224, 3)
    assert sorted(meta.ids[r] for r in meta.splits["test"]) == sorted(raw[1]["test"])
    for row, obj in enumerate(meta.ids):
        c = CLASSES.index(obj.rsplit("_", 1)[0])
        assert meta.labels[row] == c
        assert front[row, 0, 100, 100].tolist() == list(view_colour(c, 1))
        assert rear[row, 0, 100, 100].tolist() == list(view_colour(c, 7))


def test_views(cache_dir):
    out, _ = cache_dir
    ds = ModelNet40(Modelnet40Params(root=str(out)))
    assert [m.shape for m in ds.modalities] == [(3, 1, 224, 224), (3, 1, 224, 224)]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    for split in ("train", "test"):
        data = ds.split(split)
        x, y = data[0]
        assert x["front"].shape == (3, 1, 224, 224) and x["front"].dtype == torch.float32
        # uniform renders: any crop or flip keeps the colour; ImageNet normalisation
        for m, view in (("front", 1), ("rear", 7)):
            expected = (torch.tensor(view_colour(y, view), dtype=torch.float32) / 255 - mean) / std
            assert torch.allclose(x[m][:, 0, 112, 112], expected, atol=1e-3)
    assert len(ds.split("train")) == 7 and len(ds.split("val")) == 2


def test_raw_may_be_the_renders_folder(raw, tmp_path):
    report = prepare("modelnet40", raw[0] / "modelnet40_images_new_12x", tmp_path / "c", progress=False)
    assert report.counts["test"]["prepared"] == 6
    with pytest.raises(DataError, match="modelnet40_images_new_12x"):
        prepare("modelnet40", tmp_path / "c", tmp_path / "d", progress=False)


def test_missing_and_corrupt_views(tmp_path):
    raw = tmp_path / "raw"
    names = write_modelnet40(raw, train_per_class=2, test_per_class=1, size=16)
    gone = view_path(raw, "bed", "test", names["test"][2], 7)
    gone.unlink()
    bad = view_path(raw, "airplane", "train", names["train"][0], 1)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match="1 samples with missing files and 1 corrupt"):
        prepare("modelnet40", raw, tmp_path / "failed", on_error="fail", progress=False)
    report = prepare("modelnet40", raw, tmp_path / "skipped", on_error="skip", progress=False)
    assert report.missing == {names["test"][2]: [str(gone)]}
    assert str(bad) in report.corrupt[names["train"][0]]
    assert report.counts["test"] == {"listed": 3, "prepared": 2, "missing": 1, "corrupt": 0}
    assert set(Cache(tmp_path / "skipped").meta.skipped) == {names["test"][2], names["train"][0]}


def test_one_epoch_through_cli(cache_dir, tmp_path, capsys):
    out, _ = cache_dir
    code = train_one_epoch(tmp_path, "modelnet40", out, ("front", "rear"), batch_size=4)
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
