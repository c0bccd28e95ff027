"""VGGSound: prepare from a fixture download, the cache's contents, load-time audio crops, and one epoch of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.prepare.runner import prepare
from mmbalance.datasets.vggsound import PIPELINES, VggSound, VggSoundParams
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch
from tests.fixtures.vggsound import LABELS, TONE_HZ, write_vggsound


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("vggsound_raw")
    return root, write_vggsound(root)


@pytest.fixture(scope="module")
def cache_dir(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ogmge"
    report = prepare("vggsound", raw[0], out, workers=2, progress=False)
    return out, report


def test_prepare_counts_and_ineligible_clip(raw, cache_dir):
    root, splits = raw
    out, report = cache_dir
    # 12 listed train clips, 10% (1) carved for validation; the 3-frame test clip is reported, not dropped
    assert report.counts["train"] == {"listed": 11, "prepared": 11, "missing": 0, "corrupt": 0}
    assert report.counts["val"] == {"listed": 1, "prepared": 1, "missing": 0, "corrupt": 0}
    assert report.counts["test"] == {"listed": 4, "prepared": 3, "missing": 0, "corrupt": 1}
    short = splits["short"][0]
    assert list(report.corrupt) == [short]
    assert str(root / "video" / f"{short}.mp4") in report.corrupt[short]
    assert "has 3 frame(s) at 1 fps" in report.corrupt[short] and "more than 3" in report.corrupt[short]
    assert "published_count" not in report.split_info["splits"]["test"]  # none is pinned for VGGSound
    meta = Cache(out).meta
    assert short in meta.skipped and len(meta.splits["test"]) == 3
    assert json.loads((out / "report.json").read_text())["corrupt"] == report.corrupt


def test_cached_arrays(raw, cache_dir):
    _, splits = raw
    out, _ = cache_dir
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == sorted(LABELS)  # sorted labels; the quoted one keeps its comma
    audio, visual = cache.arrays["audio"], cache.arrays["visual"]
    assert audio.shape == (16, 129, 1251) and audio.dtype == np.float16
    assert visual.shape == (16, 10, 256, 341, 3) and visual.dtype == np.uint8  # 4:3, 256-px short side
    prepared = [r for rows in meta.splits.values() for r in rows]  # a skipped clip records no size
    assert cache.sources["visual"][prepared].tolist() == [[48, 64]] * len(prepared)  # crops are drawn on it
    row = meta.ids.index(splits["test"][2])
    label = meta.classes[meta.labels[row]]
    assert label == "male speech, man speaking"
    spec = audio[row].astype(np.float32)
    tone_bin = round(TONE_HZ[label] * 256 / 16000)
    assert int(spec.mean(axis=1).argmax()) == tone_bin
    # the 4-s clip is tiled to 10 s: the tone still sounds in the last second (silence is log 1e-7 = -16)
    assert spec[tone_bin, -125:-1].mean() > 2.0
    assert cache.counts["visual"][row] == 4
    assert [read_mark(visual[row, t]) for t in range(4)] == [0, 10, 20, 30]


def test_audio_crops(cache_dir):
    out, _ = cache_dir
    ds = VggSound(VggSoundParams(root=str(out)))
    assert [m.shape for m in ds.modalities] == [(1, 129, 626), (3, 3, 224, 224)]
    stored = torch.from_numpy(ds.cache.arrays["audio"][ds.cache.meta.splits["test"][0]].astype(np.float32))
    x, _ = ds.split("test")[0]
    assert torch.equal(x["audio"][0], stored[:, 312:938])  # centred: (1251 - 626) // 2 = 312
    assert x["visual"].shape == (3, 3, 224, 224)

    released = VggSound(VggSoundParams(root=str(out), audio_crop_at_test="random")).split("test")
    torch.manual_seed(0)
    starts = set()
    for _ in range(6):
        crop = released[0][0]["audio"][0]
        start = next(s for s in range(626) if torch.equal(stored[:, s:s + 626], crop))
        starts.add(start)
    assert len(starts) > 1  # the released code's random test crop, each a window of the stored 10 s


def test_missing_video_skip_and_fail(tmp_path):
    raw = tmp_path / "raw"
    splits = write_vggsound(raw, train_per_class=2, short_clip=False)
    gone = raw / "video" / f"{splits['train'][0]}.mp4"
    gone.unlink()
    with pytest.raises(DataError, match="missing .*video/"):
        prepare("vggsound", raw, tmp_path / "failed", on_error="fail", progress=False)
    report = prepare("vggsound", raw, tmp_path / "skipped", on_error="skip", progress=False)
    assert report.missing == {splits["train"][0]: [str(gone)]}
    assert sum(c["prepared"] for c in report.counts.values()) == 8


def test_csv_errors(tmp_path):
    raw = tmp_path / "raw"
    (raw / "video").mkdir(parents=True)
    rows = [f"clip{n:04d}-ab,{n},dog barking,train\n" for n in range(6)]
    (raw / "vggsound.csv").write_text(rows[0] + "".join(rows) + 'clip0099-ab,9,"cat, purring",test\n')
    plan = VggSound.plan(raw, PIPELINES["ogmge"])
    assert any("1 repeated clips dropped" in n for n in plan.notes)
    assert plan.classes == ["cat, purring", "dog barking"]
    assert (len(plan.splits["train"]), len(plan.splits["val"])) == (5, 1)  # 10% of 6, rounded
    assert plan.splits["test"] == ["clip0099-ab_000009"]
    (raw / "vggsound.csv").write_text("abcdefghijk,5,dog barking,train\nbcdefghijkl,7,dog barking,val\n")
    with pytest.raises(DataError, match="vggsound.csv' line 2: .* with split train or test"):
        VggSound.plan(raw, PIPELINES["ogmge"])


def test_one_epoch_through_cli(cache_dir, tmp_path, capsys):
    out, _ = cache_dir
    code = train_one_epoch(tmp_path, "vggsound", out, ("audio", "visual"))
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
