"""Kinetics-Sounds: prepare from a fixture download, the cache's contents, loading, and one epoch of training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.kinetics_sounds import CLASSES, PIPELINES, KineticsSounds, KineticsSoundsParams
from mmbalance.datasets.media import decode_video_audio, natural_key
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.kinetics_sounds import CLASS_INDEX, TONE_HZ, write_kinetics_sounds
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch

PAD_OGMGE = -fe.KS_FBANK_MEAN / (2 * fe.KS_FBANK_STD)  # a zero-padded fbank frame after normalisation


def mel_bin(freq: float, bins: int = 128, sr: int = 16000) -> float:
    """The Kaldi filterbank bin centred nearest `freq` (HTK mel scale, 20 Hz to Nyquist)."""
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    return (mel(freq) - mel(20)) / ((mel(sr / 2) - mel(20)) / (bins + 1)) - 1


def fbank_frames(samples: int) -> int:
    return 1 + (samples - 400) // 160  # 25 ms windows every 10 ms at 16 kHz


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("ks_raw")
    return root, write_kinetics_sounds(root)


@pytest.fixture(scope="module")
def ogmge_cache(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ogmge"
    report = prepare("kinetics_sounds", raw[0], out, "ogmge", workers=2, progress=False)
    return out, report


def test_prepare_counts_and_report(ogmge_cache):
    out, report = ogmge_cache
    # 12 listed train clips: 1 carved for validation (1,320/14,799 of them, rounded)
    assert report.counts["train"] == {"listed": 11, "prepared": 11, "missing": 0, "corrupt": 0}
    assert report.counts["val"] == {"listed": 1, "prepared": 1, "missing": 0, "corrupt": 0}
    assert report.counts["test"] == {"listed": 3, "prepared": 3, "missing": 0, "corrupt": 0}
    assert report.split_info["splits"]["train"]["published_count"] == 13479
    assert report.split_info["splits"]["test"]["published_count"] == 2597
    assert report.split_info["is_published_split"] is False
    assert json.loads((out / "report.json").read_text())["counts"] == report.counts


def test_cached_arrays(raw, ogmge_cache):
    root, splits = raw
    out, _ = ogmge_cache
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == list(CLASSES) and len(CLASSES) == 31
    audio, visual = cache.arrays["audio"], cache.arrays["visual"]
    assert audio.shape == (15, 1024, 128) and audio.dtype == np.float16
    assert visual.shape == (15, 10, 256, 341, 3) and visual.dtype == np.uint8  # 4:3, 256-px short side
    assert cache.sources["visual"].tolist() == [[48, 64]] * 15  # the fixture's frame size, which crops are drawn on
    assert set(cache.counts["visual"].tolist()) == {4}  # 3.5 s at 1 fps: seconds 0, 1, 2, 3
    # a test clip, listed as `youtubeid_start`, is cached under its canonical id and found its video
    row = meta.ids.index(splits["test"][1])
    label = meta.labels[row]
    assert label == CLASS_INDEX[1] and meta.classes[label] == "playing_guitar"
    fbank = audio[row].astype(np.float32)
    real = fbank_frames(len(decode_video_audio(root / "videos" / f"{meta.ids[row]}.mp4", 16000)))
    assert 340 < real < 360
    # the tone's mel bin is the loudest; the frames after the clip are zero-padding, normalised
    assert abs(int(fbank[:real].mean(axis=0).argmax()) - mel_bin(TONE_HZ[label])) <= 1
    assert np.allclose(fbank[real:], PAD_OGMGE, atol=1e-3) and not np.allclose(fbank[real - 1], PAD_OGMGE)
    assert [read_mark(visual[row, t]) for t in range(4)] == [0, 10, 20, 30]


def test_split_loading_shapes(ogmge_cache):
    out, _ = ogmge_cache
    ds = KineticsSounds(KineticsSoundsParams(root=str(out)))
    assert [m.shape for m in ds.modalities] == [(1, 1024, 128), (3, 3, 224, 224)]
    train, test = ds.split("train"), ds.split("test")
    assert len(train) == 11 and len(test) == 3
    x, y = test[0]
    assert x["audio"].dtype == torch.float32 and x["audio"].shape == (1, 1024, 128)
    assert x["visual"].shape == (3, 3, 224, 224) and y in CLASS_INDEX
    assert torch.equal(test[0][0]["visual"], test[0][0]["visual"])  # test views are deterministic
    assert train[0][0]["visual"].shape == (3, 3, 224, 224)


def test_mla_from_extracted_files(tmp_path):
    raw = tmp_path / "raw"
    splits = write_kinetics_sounds(raw, train_per_class=2, videos=False, extracted=True)
    sources = KineticsSounds.plan(raw, PIPELINES["mla"]).samples
    assert all(s.files["audio"].suffix == ".wav" and s.files["visual"].is_dir() for s in sources)
    report = prepare("kinetics_sounds", raw, tmp_path / "mla", "mla", progress=False)
    assert sum(c["prepared"] for c in report.counts.values()) == 9
    cache = Cache(tmp_path / "mla")
    row = cache.meta.ids.index(splits["test"][0])
    fbank = cache.arrays["audio"][row].astype(np.float32)
    real = fbank_frames(56000)  # 3.5 s of 8 kHz wav, resampled to 16 kHz
    assert np.all(fbank[real:] == 0) and np.all(fbank[real - 1] != 0)  # MLA: no normalisation
    assert [read_mark(cache.arrays["visual"][row, t]) for t in range(4)] == [0, 10, 20, 30]
    ds = KineticsSounds(KineticsSoundsParams(root=str(tmp_path / "mla"), pipeline="mla", frames=2))
    assert ds.modalities[1].shape == (3, 2, 224, 224)


def test_frame_names_sort_naturally():
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == ["frame_1.jpg", "frame_2.jpg", "frame_10.jpg"]


def test_split_file_errors_and_repeats(tmp_path):
    raw = tmp_path / "raw"
    write_kinetics_sounds(raw, train_per_class=2, videos=False, extracted=True)
    train = raw / "my_train.txt"
    rows = train.read_text().splitlines(keepends=True)
    train.write_text(rows[0] + rows[0] + "".join(rows[1:]))
    plan = KineticsSounds.plan(raw, PIPELINES["ogmge"])
    assert any("1 repeated rows dropped" in n for n in plan.notes)
    assert sum(len(ids) for ids in plan.splits.values()) == 9
    train.write_text(rows[0] + rows[1].replace(",10,", ",10,31,"))
    with pytest.raises(DataError, match=r"my_train.txt' line 2"):
        KineticsSounds.plan(raw, PIPELINES["ogmge"])
    train.write_text(rows[0] + rows[1].rsplit(",", 1)[0] + ",31\n")
    with pytest.raises(DataError, match=r"line 2: class index 31 is out of range; allowed: 0-30"):
        KineticsSounds.plan(raw, PIPELINES["ogmge"])
    (raw / "my_test.txt").unlink()
    with pytest.raises(DataError, match="my_test.txt not found"):
        KineticsSounds.plan(raw, PIPELINES["ogmge"])


def test_missing_and_corrupt_files(tmp_path):
    raw = tmp_path / "raw"
    splits = write_kinetics_sounds(raw, train_per_class=2, extracted=True)
    # a clip without its wav falls back to its video; one without any file is reported missing
    fallback, gone, broken = splits["train"][0], splits["test"][0], splits["train"][3]
    (raw / "audio" / f"{fallback}.wav").unlink()
    (raw / "audio" / f"{gone}.wav").unlink()
    for f in (raw / "Image-01-FPS" / gone).iterdir():
        f.unlink()
    (raw / "Image-01-FPS" / gone).rmdir()
    (raw / "videos" / f"{gone}.mp4").unlink()
    (raw / "audio" / f"{broken}.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    # a clip whose video ends early is still found by its YouTube id and start second
    short = splits["test"][1]
    (raw / "audio" / f"{short}.wav").unlink()
    cut = raw / "videos" / (short[:-6] + f"{int(short[-6:]) - 3:06d}.mp4")
    (raw / "videos" / f"{short}.mp4").rename(cut)
    sources = {s.id: s for s in KineticsSounds.plan(raw, PIPELINES["ogmge"]).samples}
    assert sources[short].files["audio"] == cut
    assert sources[fallback].files["audio"] == raw / "videos" / f"{fallback}.mp4"
    assert sources[fallback].files["visual"] == raw / "Image-01-FPS" / fallback
    assert sources[gone].files == {"video": raw / "videos" / f"{gone}.mp4"}

    with pytest.raises(DataError, match="missing .*videos"):
        prepare("kinetics_sounds", raw, tmp_path / "failed", on_error="fail", progress=False)
    with pytest.raises(DataError, match="unfinished"):
        Cache(tmp_path / "failed")
    report = prepare("kinetics_sounds", raw, tmp_path / "skipped", on_error="skip", progress=False)
    assert report.missing == {gone: [str(raw / "videos" / f"{gone}.mp4")]}
    assert list(report.corrupt) == [broken] and str(raw / "audio" / f"{broken}.wav") in report.corrupt[broken]
    assert report.counts["test"] == {"listed": 3, "prepared": 2, "missing": 1, "corrupt": 0}
    meta = Cache(tmp_path / "skipped").meta
    assert {gone, broken} <= set(meta.skipped)
    assert fallback in [meta.ids[r] for r in meta.splits["train"] + meta.splits["val"]]


def test_one_epoch_through_cli(ogmge_cache, tmp_path, capsys):
    out, _ = ogmge_cache
    code = train_one_epoch(tmp_path, "kinetics_sounds", out, ("audio", "visual"))
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
