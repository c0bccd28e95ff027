"""AVE: prepare from a fixture download, both pipelines' caches, the published lists, problems
reported by path, loading, and one epoch of training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets.ave import PIPELINES, Ave, AveParams
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.prepare.runner import prepare
from mmbalance.datasets.splits import compare_with_published, load_manifest
from tests.fixtures.ave import CLASSES, DUPLICATE, EMPTY, FPS, SHARED, TONE_HZ, write_ave
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch

PSD_BIN_HZ = 16000 / 512


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("ave_raw")
    return root, write_ave(root)


@pytest.fixture(scope="module")
def dimml_cache(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "dimml"
    return out, prepare("ave", raw[0], out, "dimml", workers=2, progress=False)


@pytest.fixture(scope="module")
def ogmge_cache(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ogmge"
    return out, prepare("ave", raw[0], out, "ogmge", progress=False)


def _row(cache: Cache, sid: str) -> int:
    return cache.meta.ids.index(sid)


def test_prepare_counts_and_notes(dimml_cache):
    out, report = dimml_cache
    # 13 train rows: the empty event and the second row of the repeated video are left out
    assert report.counts["train"] == {"listed": 11, "prepared": 11, "missing": 0, "corrupt": 0}
    assert report.counts["val"]["prepared"] == 6 and report.counts["test"]["prepared"] == 6
    notes = " | ".join(report.notes)
    assert f"left out 1 row(s) whose event is empty (end <= start): {EMPTY}" in notes
    assert "(11 of 12 rows)" in notes and f"{SHARED}@train" in notes
    info = report.split_info
    assert info["is_published_split"] is False
    assert [info["splits"][s]["published_count"] for s in ("train", "val", "test")] == [3311, 401, 402]
    assert info["splits"]["val"]["matches_pinned_list"] is False
    assert json.loads((out / "report.json").read_text())["counts"] == report.counts


def test_dimml_cache_holds_the_event_segment(raw, dimml_cache):
    cache = Cache(dimml_cache[0])
    assert cache.meta.classes == list(CLASSES)  # order of first appearance in testSet.txt
    audio, visual = cache.arrays["audio"], cache.arrays["visual"]
    assert audio.shape == (23, 257, 1004) and audio.dtype == np.float16
    assert visual.shape == (23, 10, 256, 341, 3) and visual.dtype == np.uint8  # 4:3, 256-px short side
    assert cache.sources["visual"].tolist() == [[48, 64]] * 23  # the fixture's frame size, which crops are drawn on
    rows = raw[1]
    for split in ("val", "test"):
        for ev in rows[split]:
            r = _row(cache, ev.video)
            assert cache.meta.labels[r] == CLASSES.index(ev.category)
            # 1-fps frames at seconds start..end-1: frames start*FPS, (start+1)*FPS, ...
            assert cache.counts["visual"][r] == ev.end - ev.start
            assert [read_mark(visual[r, t]) for t in range(ev.end - ev.start)] == [
                s * FPS for s in range(ev.start, ev.end)]
            spec = audio[r].astype(np.float32)
            assert abs(spec.mean()) < 1e-2 and abs(spec.std() - 1) < 1e-2  # z-scored per clip
            tone_bin = round(TONE_HZ[ev.category] / PSD_BIN_HZ)
            assert int(np.argmax(spec.mean(axis=1))) == tone_bin
            # only the event is tiled to 10 s, so the tone is in every one of the 1,004 frames
            assert spec[tone_bin].min() > 3.0
    # the repeated video keeps its first row (class 0, [0, 2)); the shared video's train copy
    # has its own event (class 2, [1, 4)) and id
    dup, shared = _row(cache, DUPLICATE), _row(cache, f"{SHARED}@train")
    assert (cache.meta.labels[dup], cache.counts["visual"][dup]) == (0, 2)
    assert (cache.meta.labels[shared], cache.counts["visual"][shared]) == (2, 3)
    assert [read_mark(visual[shared, t]) for t in range(3)] == [10, 20, 30]
    assert EMPTY not in cache.meta.ids


def test_ogmge_cache_holds_the_whole_clip(raw, ogmge_cache):
    cache = Cache(ogmge_cache[0])
    audio, visual = cache.arrays["audio"], cache.arrays["visual"]
    assert audio.shape == (23, 1024, 128) and audio.dtype == np.float16
    assert set(cache.counts["visual"].tolist()) == {4}  # every second of the 4-s clips
    ev = raw[1]["test"][1]  # an event in [1, 3) s of a 4-s clip
    r = _row(cache, ev.video)
    assert [read_mark(visual[r, t]) for t in range(4)] == [0, 10, 20, 30]
    loudest = audio[r].astype(np.float32).max(axis=1)  # per 10-ms frame, the loudest mel bin
    # the whole clip, not the event: the tone is loud in frames ~100-300 only, quiet before
    assert loudest[110:290].min() > 0.8 and loudest[:90].max() < 0.5
    # the 4-s clip gives ~400 frames; the zero padding after them is normalised to
    # (0 + 4.503877) / (2 * 5.141276)
    np.testing.assert_allclose(audio[r, 410:].astype(np.float32), 4.503877 / (2 * 5.141276), atol=1e-3)


def test_split_loading_shapes(dimml_cache, ogmge_cache):
    ds = Ave(AveParams(root=str(dimml_cache[0])))
    assert [m.shape for m in ds.modalities] == [(1, 257, 1004), (3, 4, 224, 224)]
    train, test = ds.split("train"), ds.split("test")
    assert (len(train), len(ds.split("val")), len(test)) == (11, 6, 6)
    x, y = train[0]
    assert x["audio"].dtype == torch.float32 and x["visual"].shape == (3, 4, 224, 224)
    assert 0 <= y < 3
    assert torch.equal(test[1][0]["visual"], test[1][0]["visual"])  # segment centres at test
    ogmge = Ave(AveParams(root=str(ogmge_cache[0]), pipeline="ogmge", frame_size=64))
    assert [m.shape for m in ogmge.modalities] == [(1, 1024, 128), (3, 3, 64, 64)]
    with pytest.raises(DataError, match="dataset.pipeline"):
        Ave(AveParams(root=str(ogmge_cache[0]))).split("train")


def test_published_lists_match_when_split_files_are_absent(tmp_path):
    # a download without valSet.txt / testSet.txt: the vendored official lists stand in, and the
    # split comparison finds them identical to the pinned ones (the repeated val video counted once)
    (tmp_path / "AVE").mkdir()
    (tmp_path / "trainSet.txt").write_text("Bark&someVideo01&good&0&10\n")
    plan = Ave.plan(tmp_path, PIPELINES["dimml"])
    assert (len(plan.splits["val"]), len(plan.splits["test"])) == (401, 402)
    assert len(plan.classes) == 28 and (plan.classes[0], plan.classes[-1]) == ("Church bell", "Mandolin")
    assert any("vendored published list lists/ave_val.txt" in n for n in plan.notes)
    info = compare_with_published(plan.splits, load_manifest("ave").flavour("official"))
    assert info["splits"]["val"]["matches_pinned_list"] and info["splits"]["test"]["matches_pinned_list"]
    assert plan.splits["val"].count("3tsi7DKGrWQ") == 1


def test_split_file_errors_name_the_line(raw, tmp_path):
    shutil.copytree(raw[0], tmp_path / "r", ignore=shutil.ignore_patterns("*.mp4"))
    bad = tmp_path / "r" / "trainSet.txt"
    bad.write_text("Bark&someVideo01&good&0\n")
    with pytest.raises(DataError, match=r"trainSet.txt' line 1: .* is not `Category&VideoID"):
        Ave.plan(tmp_path / "r", PIPELINES["dimml"])
    bad.write_text("Bark&someVideo01&good&0&12\n")
    with pytest.raises(DataError, match=r"line 1: event \[0, 12\) is not inside the 10-s clip"):
        Ave.plan(tmp_path / "r", PIPELINES["dimml"])
    bad.write_text("Goat&someVideo01&good&0&10\n")
    with pytest.raises(DataError, match="class 'Goat' does not occur in testSet.txt"):
        Ave.plan(tmp_path / "r", PIPELINES["dimml"])
    with pytest.raises(DataError, match="--raw must be the AVE_Dataset folder"):
        Ave.plan(tmp_path, PIPELINES["dimml"])


def test_missing_and_corrupt_videos_fail_then_skip(raw, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raw[0], root)
    gone = root / "AVE" / f"{raw[1]['test'][2].video}.mp4"
    gone.unlink()
    broken = root / "AVE" / f"{raw[1]['val'][1].video}.mp4"
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(DataError, match="1 samples with missing files and 1 corrupt"):
        prepare("ave", root, tmp_path / "c", on_error="fail", progress=False)
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert saved["missing"] == {raw[1]["test"][2].video: [str(gone)]}
    assert str(broken) in saved["corrupt"][raw[1]["val"][1].video]
    with pytest.raises(DataError, match="unfinished"):
        Cache(tmp_path / "c")
    # skipping them finishes the same cache without decoding the other 21 again
    report = prepare("ave", root, tmp_path / "c", on_error="skip", progress=False)
    assert report.processed == 0
    assert report.counts["test"] == {"listed": 6, "prepared": 5, "missing": 1, "corrupt": 0}
    assert report.counts["val"] == {"listed": 6, "prepared": 5, "missing": 0, "corrupt": 1}
    meta = Cache(tmp_path / "c").meta
    assert len(meta.splits["test"]) == 5 and raw[1]["test"][2].video in meta.skipped


def test_one_epoch_through_cli(ogmge_cache, tmp_path, capsys):
    code = train_one_epoch(tmp_path, "ave", ogmge_cache[0], ("audio", "visual"), pipeline="ogmge")
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
