"""UCF101: prepare from a fixture download, the cached windows/candidates, both pipelines' views,
flow flips, missing/corrupt files, and one epoch of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.prepare.runner import prepare
from mmbalance.datasets.transforms import FrameClip
from mmbalance.datasets.ucf101 import (
    DIMML_TEST_MEAN,
    DIMML_TEST_STD,
    DIMML_TRAIN_MEAN,
    DIMML_TRAIN_STD,
    FlowClip,
    Ucf101,
    Ucf101Params,
    read_split_list,
    segment_centres,
    window_starts,
)
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch
from tests.fixtures.ucf101 import CLASSES, flow_value, write_ucf101


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf_raw")
    return root, write_ucf101(root)  # 3 classes x (3 train + 2 test) videos of 25 frames, 24 flow pairs


@pytest.fixture(scope="module")
def dimml(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "dimml"
    return out, prepare("ucf101", raw[0], out, "dimml", workers=2, progress=False)


def test_prepare_counts_and_report(raw, dimml):
    out, report = dimml
    # 9 listed train videos: 1 carved for validation (10% of 9, rounded)
    assert report.counts["train"] == {"listed": 8, "prepared": 8, "missing": 0, "corrupt": 0}
    assert report.counts["val"] == {"listed": 1, "prepared": 1, "missing": 0, "corrupt": 0}
    assert report.counts["test"] == {"listed": 6, "prepared": 6, "missing": 0, "corrupt": 0}
    assert report.split_info["is_published_split"] is False
    assert report.split_info["splits"]["test"]["published_count"] == 3783
    assert report.notes == ["classInd.txt names 3 classes (UCF101 has 101)"]
    meta = Cache(out).meta
    assert meta.classes == list(CLASSES)
    # testlist lines carry no label: it comes from the class folder (HandstandPushups holds the
    # videos spelled v_HandStandPushups_...)
    assert meta.labels[meta.ids.index("v_HandStandPushups_g02_c01")] == 2
    assert json.loads((out / "report.json").read_text())["counts"] == report.counts


def test_window_positions():
    assert window_starts(24, 3, 10) == [0, 7, 14]
    assert window_starts(6, 3, 10) == [0, 0, 0]
    # the centre window is DI-MML's test window, offset n // 2 - 5
    assert all(window_starts(n, 3, 10)[1] == n // 2 - 5 for n in range(10, 400))
    assert segment_centres(25, 6) == [2, 6, 10, 14, 18, 22]
    assert segment_centres(2, 6) == [0, 0, 0, 1, 1, 1]


def test_cached_windows(raw, dimml):
    out, _ = dimml
    cache = Cache(out)
    rgb, flow = cache.arrays["rgb"], cache.arrays["flow"]
    # whole 340 x 256 frames (the fixture's 56 x 40 at a 256-px short side, 358 wide, centre-cropped)
    assert rgb.shape == (15, 3, 256, 340, 3) and rgb.dtype == np.uint8
    assert flow.shape == (15, 3, 10, 256, 340, 2) and flow.dtype == np.uint8
    # 24 flow frames: windows start at frames 0, 7 and 14; the RGB frame is position 6 of each
    assert [read_mark(rgb[0, w]) for w in range(3)] == [6, 13, 20]
    for w, start in enumerate((0, 7, 14)):
        expected = np.array([flow_value(start + t) for t in range(10)], dtype=float)  # (10, 2)
        assert np.abs(flow[0, w, :, 120, 120].astype(float) - expected).max() <= 2  # jpeg rounding


def test_dimml_views(dimml):
    out, _ = dimml
    ds = Ucf101(Ucf101Params(root=str(out)))
    assert [m.shape for m in ds.modalities] == [(3, 1, 224, 224), (2, 10, 224, 224)]
    stored = ds.cache.arrays
    x, y = ds.split("test")[0]
    row = ds.cache.meta.splits["test"][0]
    assert x["flow"].shape == (2, 10, 224, 224) and x["flow"].dtype == torch.float32
    # test: centre window, 0-255 minus 127.5 without division
    centre = torch.from_numpy(stored["flow"][row, 1, :, 120, 120].astype(np.float32)).T  # (2, 10)
    assert torch.allclose(x["flow"][:, :, 100, 100], centre - 127.5, atol=1e-3)
    # test RGB: the centre window's frame, normalised on the 0-255 scale with DI-MML's train stats
    pixel = torch.from_numpy(stored["rgb"][row, 1, 120, 120].astype(np.float32))
    expect = (pixel - torch.tensor(DIMML_TRAIN_MEAN)) / torch.tensor(DIMML_TRAIN_STD)
    assert torch.allclose(x["rgb"][:, 0, 100, 100], expect, atol=1e-4)
    # the released code's per-split statistics at test, its train statistics in training
    per_split = Ucf101(Ucf101Params(root=str(out), rgb_stats="per_split"))
    expect = (pixel - torch.tensor(DIMML_TEST_MEAN)) / torch.tensor(DIMML_TEST_STD)
    assert torch.allclose(per_split.split("test")[0][0]["rgb"][:, 0, 100, 100], expect, atol=1e-4)
    # training draws one of the 3 stored windows per sample
    torch.manual_seed(0)
    train = ds.split("train")
    windows_u = np.abs(stored["flow"][train.rows[0], :, 0, 120, 120, 0].astype(np.float32) - 127.5)  # flips negate u
    drawn = set()
    for _ in range(30):
        gap = np.abs(windows_u - float(train[0][0]["flow"][0, 0].mean().abs()))
        assert gap.min() < 1e-3
        drawn.add(int(gap.argmin()))
    assert drawn == {0, 1, 2}


def _ramps(windows: int = 3) -> np.ndarray:
    """(W, 10, 8, 8, 2) flow: u rises left to right (10..80), v falls (200..130)."""
    x = np.arange(8) * 10
    arr = np.empty((windows, 10, 8, 8, 2), np.uint8)
    arr[..., 0] = 10 + x
    arr[..., 1] = 200 - x
    return arr


def _flow_clip(flip: str) -> FlowClip:
    clip = FrameClip(True, 10, 8, "window", "random", "center", flip=False, mean=(0.5, 0.5), std=(1 / 255, 1 / 255))
    return FlowClip(clip, windowed=True, flip=flip)


def test_flow_flip_negates_u():
    arr, view = _ramps(), _flow_clip("negate_u")
    u, v = arr[0, 0, 0, :, 0].astype(np.float32), arr[0, 0, 0, :, 1].astype(np.float32)
    seen = set()
    torch.manual_seed(1)
    for _ in range(20):
        out = view(arr)[:, 0, 0].numpy()  # (2, 8): one row of each channel
        if np.allclose(out[0], u - 127.5):
            assert np.allclose(out[1], v - 127.5)
            seen.add("kept")
        else:  # mirrored, and u -> 255 - u
            assert np.allclose(out[0], (255 - u[::-1]) - 127.5, atol=1e-3)
            assert np.allclose(out[1], v[::-1] - 127.5, atol=1e-3)
            seen.add("flipped")
    assert seen == {"kept", "flipped"}


def test_flow_flip_reference_modes():
    arr = _ramps()
    u, v = arr[0, 0, 0, :, 0].astype(np.float32) - 127.5, arr[0, 0, 0, :, 1].astype(np.float32) - 127.5
    torch.manual_seed(2)
    view = _flow_clip("u_only")  # DI-MML: u mirrored, not negated; v untouched
    outs = [view(arr)[:, 0, 0].numpy() for _ in range(20)]
    assert all(np.allclose(o[1], v, atol=1e-3) for o in outs)
    assert {bool(np.allclose(o[0], u[::-1], atol=1e-3)) for o in outs} == {True, False}
    view = _flow_clip("independent")  # BalanceBenchmark: each u and v image on its own coin
    pairs = set()
    for _ in range(40):
        o = view(arr)[:, :, 0].numpy()  # (2, 10, 8)
        for t in range(10):
            pairs.add((bool(np.allclose(o[0, t], u[::-1], atol=1e-3)), bool(np.allclose(o[1, t], v[::-1], atol=1e-3))))
    assert pairs == {(False, False), (False, True), (True, False), (True, True)}


def test_balancebench_pipeline(raw, tmp_path):
    report = prepare("ucf101", raw[0], tmp_path / "bb", "balancebench", progress=False)
    assert report.counts["test"]["prepared"] == 6
    cache = Cache(tmp_path / "bb")
    rgb, flow = cache.arrays["rgb"], cache.arrays["flow"]
    assert rgb.shape == (15, 6, 224, 224, 3) and flow.shape == (15, 6, 224, 224, 2)
    # 25 RGB frames and 24 flow pairs: the centres of 6 equal segments
    assert [read_mark(rgb[0, k]) for k in range(6)] == [2, 6, 10, 14, 18, 22]
    assert np.abs(flow[0, :, 50, 50, 0].astype(int) - [flow_value(i)[0] for i in (2, 6, 10, 14, 18, 22)]).max() <= 2
    ds = Ucf101(Ucf101Params(root=str(tmp_path / "bb"), pipeline="balancebench"))
    assert [m.shape for m in ds.modalities] == [(3, 3, 224, 224), (2, 3, 224, 224)]
    x, _ = ds.split("test")[0]
    row = cache.meta.splits["test"][0]
    # test: segment centres of the 6 candidates (1, 3, 5); flow not normalised, on [0, 1]
    expected = torch.from_numpy(flow[row, [1, 3, 5], 50, 50].astype(np.float32)).T / 255
    assert torch.allclose(x["flow"][:, :, 50, 50], expected, atol=1e-6)
    with pytest.raises(ConfigError, match="rgb_stats"):
        Ucf101(Ucf101Params(root=str(tmp_path / "bb"), pipeline="balancebench", rgb_stats="per_split")).split("test")


def test_split_list_errors(tmp_path):
    bad = tmp_path / "trainlist01.txt"
    bad.write_text("Archery/v_Archery_g08_c01.avi 1\r\n")
    with pytest.raises(DataError, match="line 1: label 1 disagrees"):
        read_split_list(bad, list(CLASSES), labelled=True)
    bad.write_text("Archery/v_Archery_g08_c01.avi 2\r\nBowling/v_Bowling_g08_c01.avi 2\r\n")
    with pytest.raises(DataError, match="line 2"):
        read_split_list(bad, list(CLASSES), labelled=True)
    # a test list may carry labels (DI-MML's testlist001.txt); they are checked too
    bad.write_text("Archery/v_Archery_g01_c01.avi\r\nArchery/v_Archery_g02_c01.avi 2\r\n")
    assert read_split_list(bad, list(CLASSES), labelled=False) == {"v_Archery_g01_c01": 1, "v_Archery_g02_c01": 1}
    bad.write_text("Archery/v_Archery_g01_c01.avi 3\r\n")
    with pytest.raises(DataError, match="label 3 disagrees"):
        read_split_list(bad, list(CLASSES), labelled=False)
    with pytest.raises(DataError, match="ucfTrainTestlist"):
        prepare("ucf101", tmp_path, tmp_path / "c", progress=False)


def test_missing_and_corrupt_frames(tmp_path):
    raw = tmp_path / "raw"
    names = write_ucf101(raw, train_per_class=2, test_per_class=1, frames=14)
    gone = raw / "tvl1_flow" / "u" / names["test"][0]
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    bad = raw / "tvl1_flow" / "v" / names["train"][0] / "frame000003.jpg"
    bad.write_bytes(b"\xff\xd8not a jpeg")
    with pytest.raises(DataError, match="1 samples with missing files and 1 corrupt"):
        prepare("ucf101", raw, tmp_path / "failed", on_error="fail", progress=False)
    with pytest.raises(DataError, match="unfinished"):
        Cache(tmp_path / "failed")
    report = prepare("ucf101", raw, tmp_path / "skipped", on_error="skip", progress=False)
    assert report.missing == {names["test"][0]: [str(gone)]}
    assert str(bad) in report.corrupt[names["train"][0]]
    assert report.counts["test"] == {"listed": 3, "prepared": 2, "missing": 1, "corrupt": 0}
    meta = Cache(tmp_path / "skipped").meta
    assert set(meta.skipped) == {names["test"][0], names["train"][0]}


def test_one_epoch_through_cli(dimml, tmp_path, capsys):
    out, _ = dimml
    code = train_one_epoch(tmp_path, "ucf101", out, ("rgb", "flow"), batch_size=4)
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


def test_dimml_training_crops_range_over_the_whole_frame_as_dimmls(dimml):
    # DI-MML's GroupRandomCrop(224) places the crop anywhere in the 340 x 256 frame
    view = Ucf101(Ucf101Params(root=str(dimml[0]))).views(train=True)["rgb"]
    torch.manual_seed(0)
    lefts, tops = set(), set()
    for _ in range(3000):
        x1, y1, x2, y2 = view.region((256, 340), None)
        assert (x2 - x1, y2 - y1) == (224, 224)
        lefts.add(x1)
        tops.add(y1)
    assert lefts == set(range(340 - 224 + 1)) and tops == set(range(256 - 224 + 1))
