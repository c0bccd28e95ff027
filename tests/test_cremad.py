"""CREMA-D: prepare from a fixture download, the cache's contents, loading, and one epoch of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.cremad import CremaD, CremadParams
from mmbalance.datasets.prepare.runner import prepare
from mmbalance.datasets.splits import load_manifest, read_pinned_list
from tests.fixtures.cremad import EMOTIONS, TONE_HZ, write_cremad
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad_raw")
    return root, write_cremad(root)


@pytest.fixture(scope="module")
def ogmge_cache(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ogmge"
    report = prepare("cremad", raw[0], out, "ogmge", workers=2, progress=False)
    return out, report


def test_prepare_counts_and_report(raw, ogmge_cache):
    out, report = ogmge_cache
    # 18 listed train clips: 2 carved for validation (744/6698 per class, largest remainders)
    assert report.counts["train"] == {"listed": 16, "prepared": 16, "missing": 0, "corrupt": 0}
    assert report.counts["val"]["prepared"] == 2
    assert report.counts["test"] == {"listed": 6, "prepared": 6, "missing": 0, "corrupt": 0}
    assert report.split_info["is_published_split"] is False  # a fixture is not the 5,954/744/744 split
    assert report.split_info["splits"]["test"]["published_count"] == 744
    saved = json.loads((out / "report.json").read_text())
    assert saved["counts"] == report.counts


def test_cached_arrays(raw, ogmge_cache):
    out, _ = ogmge_cache
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == list(EMOTIONS)
    audio, visual = cache.arrays["audio"], cache.arrays["visual"]
    assert audio.shape == (24, 257, 188) and audio.dtype == np.float16
    # frames kept at 4:3 with a 256-px short side, and the fixture's 64 x 48 frame size beside them
    assert visual.shape == (24, 6, 256, 341, 3) and visual.dtype == np.uint8
    assert cache.sources["visual"].tolist() == [[48, 64]] * 24
    # 2.2 s at 30 fps -> frames 0 and 30 and 60 kept (1 fps)
    assert set(cache.counts["visual"].tolist()) == {3}
    row = meta.ids.index(raw[1]["test"][2])  # a SAD clip
    emotion = meta.ids[row].split("_")[2]
    assert meta.labels[row] == EMOTIONS.index(emotion)
    # the tone's STFT bin (22,050 Hz resampled, n_fft 512) is the loudest row of the spectrogram
    expected_bin = round(TONE_HZ[emotion] * 512 / 22050)
    assert abs(int(np.argmax(audio[row].astype(np.float32).mean(axis=1))) - expected_bin) <= 1
    # the 3 frames kept at 1 fps are the first of each second: frames 0, 30 and 60
    assert [read_mark(visual[row, t]) for t in range(3)] == [0, 30, 60]


def test_split_loading_shapes(ogmge_cache):
    out, _ = ogmge_cache
    ds = CremaD(CremadParams(root=str(out)))
    assert [m.shape for m in ds.modalities] == [(1, 257, 188), (3, 1, 224, 224)]
    train, test = ds.split("train"), ds.split("test")
    assert len(train) == 16 and len(test) == 6
    x, y = test[0]
    assert x["audio"].dtype == torch.float32 and x["audio"].shape == (1, 257, 188)
    assert x["visual"].shape == (3, 1, 224, 224)
    assert 0 <= y < 6
    # test-time views are deterministic; training views draw crops
    assert torch.equal(test[0][0]["visual"], test[0][0]["visual"])


def test_dimml_and_mla_pipelines(raw, tmp_path):
    dimml = prepare("cremad", raw[0], tmp_path / "dimml", "dimml", progress=False)
    cache = Cache(tmp_path / "dimml")
    spec = cache.arrays["audio"][0].astype(np.float32)
    assert spec.shape == (257, 1004)
    assert abs(spec.mean()) < 1e-2 and abs(spec.std() - 1) < 1e-2  # z-scored per clip
    ds = CremaD(CremadParams(root=str(tmp_path / "dimml"), pipeline="dimml"))
    assert ds.modalities[1].shape == (3, 3, 224, 224)
    assert dimml.counts["test"]["prepared"] == 6

    # MLA's split files are absent from the fixture: its vendored 744-clip test list is the test
    # split, the fixture clips it names are prepared and the rest are reported missing
    mla = prepare("cremad", raw[0], tmp_path / "mla", "mla", progress=False)
    fixture = set(raw[1]["train"] + raw[1]["test"])
    in_list = [c for c in mla_test_list() if c in fixture]
    assert mla.counts["test"] == {"listed": 744, "prepared": len(in_list), "missing": 744 - len(in_list), "corrupt": 0}
    assert mla.counts["train"]["listed"] + mla.counts["val"]["listed"] == 24 - len(in_list)
    assert mla.split_info["splits"]["test"]["matches_pinned_list"] is True
    assert Cache(tmp_path / "mla").arrays["audio"].shape[1:] == (1024, 128)


def test_missing_frame_folder_skip_and_fail(tmp_path):
    raw = tmp_path / "raw"
    names = write_cremad(raw, train_per_class=2, test_per_class=1, frame_folders=True)
    gone = raw / "Image-01-FPS" / names["test"][0]
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    with pytest.raises(DataError, match="missing .*Image-01-FPS"):
        prepare("cremad", raw, tmp_path / "failed", on_error="fail", progress=False)
    with pytest.raises(DataError, match="unfinished"):
        Cache(tmp_path / "failed")
    report = prepare("cremad", raw, tmp_path / "skipped", on_error="skip", progress=False)
    assert report.counts["test"]["missing"] == 1 and report.counts["test"]["prepared"] == 5
    assert str(gone) in report.missing[names["test"][0]]
    meta = Cache(tmp_path / "skipped").meta
    assert names["test"][0] in meta.skipped and len(meta.splits["test"]) == 5


def test_corrupt_wav_is_reported_and_resume_finishes(tmp_path):
    raw = tmp_path / "raw"
    names = write_cremad(raw, train_per_class=2, test_per_class=1)
    bad = raw / "AudioWAV" / f"{names['train'][0]}.wav"
    good = bad.read_bytes()
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DataError, match="corrupt"):
        prepare("cremad", raw, tmp_path / "c", on_error="fail", progress=False)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert str(bad) in report["corrupt"][names["train"][0]]
    # fixing the file and re-running decodes only what is missing
    bad.write_bytes(good)
    again = prepare("cremad", raw, tmp_path / "c", on_error="fail", progress=False)
    assert again.processed == 1
    assert sum(c["prepared"] for c in again.counts.values()) == 18


def test_other_pipeline_into_same_dir_is_refused(raw, ogmge_cache):
    out, _ = ogmge_cache
    with pytest.raises(DataError, match="already holds a different cache"):
        prepare("cremad", raw[0], out, "dimml", progress=False)


def test_cache_pipeline_mismatch_names_key(ogmge_cache):
    out, _ = ogmge_cache
    with pytest.raises(DataError, match="dataset.pipeline"):
        CremaD(CremadParams(root=str(out), pipeline="mla")).split("train")


def test_one_epoch_through_cli(ogmge_cache, tmp_path, capsys):
    out, _ = ogmge_cache
    code = train_one_epoch(tmp_path, "cremad", out, ("audio", "visual"))
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


def test_deferred_views_finish_on_the_device_as_the_per_sample_path_does(ogmge_cache):
    out, _ = ogmge_cache
    ds = CremaD(CremadParams(root=str(out), pipeline="ogmge"))
    loader_side, finish = ds.loader_split("test", augment=False, on_device=True)
    assert set(finish) == {"audio", "visual"}
    x, _ = loader_side[0]
    assert x["audio"].dtype == torch.float16 and x["visual"].dtype == torch.uint8
    assert x["visual"].shape == (1, 256, 341, 3)  # frames chosen, still as stored
    per_sample, no_finish = ds.loader_split("test", augment=False, on_device=False)
    assert no_finish == {}
    reference = torch.stack([per_sample[i][0]["visual"] for i in range(3)])
    batch = loader_side.batch([0, 1, 2])
    # the stored frames shrink to 224: the per-sample view resizes uint8 (rounds), the batch one floats
    assert torch.allclose(finish["visual"](batch.inputs["visual"], batch.inputs["visual.draws"]), reference,
                          atol=1.5 / 255 / 0.224)
    audio = torch.stack([per_sample[i][0]["audio"] for i in range(3)])
    assert torch.equal(finish["audio"](batch.inputs["audio"]), audio)
    # training: the two halves crop the same regions (drawn on the 64 x 48 source, per sample)
    train_side, train_finish = ds.loader_split("train", augment=True, on_device=True)
    train_full, _ = ds.loader_split("train", augment=True, on_device=False)
    torch.manual_seed(3)
    drawn = train_side.batch([0, 1, 2, 3], seeds=[5, 6, 7, 8])
    clips = train_finish["visual"](drawn.inputs["visual"], drawn.inputs["visual.draws"])
    assert clips.shape == (4, 3, 1, 224, 224) and clips.dtype == torch.float32 and torch.isfinite(clips).all()
    full = train_full.batch([0, 1, 2, 3], seeds=[5, 6, 7, 8]).inputs["visual"]
    assert float((clips - full).abs().mean()) < 0.05  # uniform fixture frames: interpolation differs at edges only


def test_a_batch_is_its_items_drawn_one_by_one_under_their_seeds(ogmge_cache):
    ds = CremaD(CremadParams(root=str(ogmge_cache[0])))
    for on_device in (False, True):
        split, _ = ds.loader_split("train", augment=True, on_device=on_device)
        batch = split.batch([3, 0, 7], seeds=[11, 12, 13])
        for j, (i, seed) in enumerate(zip([3, 0, 7], [11, 12, 13])):
            torch.manual_seed(seed)
            item, label = split[i]
            assert label == int(batch.labels[j])
            assert item.keys() == batch.inputs.keys()
            assert all(torch.equal(item[k], batch.inputs[k][j]) for k in item), (on_device, i)


def test_batches_from_reused_arrays_never_overwrite_a_batch_in_use(ogmge_cache):
    from mmbalance.bench.data import SplitLoader, epoch_generator

    ds = CremaD(CremadParams(root=str(ogmge_cache[0])))
    for on_device in (False, True):
        split, _ = ds.loader_split("train", augment=True, on_device=on_device)
        first = split.batch([0, 1, 2, 3], seeds=[1, 2, 3, 4])
        kept = {m: x.clone() for m, x in first.inputs.items()}
        second = split.batch([4, 5, 6, 7], seeds=[5, 6, 7, 8])
        assert all(torch.equal(first.inputs[m], kept[m]) for m in kept)  # the second batch has its own arrays
        address = first.inputs["visual"].data_ptr()
        del first
        third = split.batch([0, 1, 2, 3], seeds=[1, 2, 3, 4])
        assert third.inputs["visual"].data_ptr() == address  # the first batch's arrays, free again
        assert all(torch.equal(third.inputs[m], kept[m]) for m in kept) and second.labels.shape == (4,)
        # loader workers keep their own arrays: the same batches with 0 or 2 workers, pass after pass
        inline, pooled = (SplitLoader(split, 4, torch.device("cpu"), workers=w) for w in (0, 2))
        for epoch in (0, 1):
            for a, b in zip(inline(epoch_generator(0, epoch)), pooled(epoch_generator(0, epoch)), strict=True):
                assert all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)


def test_an_old_cache_names_the_command_that_prepares_it_again(ogmge_cache, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((ogmge_cache[0] / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(DataError, match=r"format 1.*reads format 2.*mmbalance prepare cremad --pipeline ogmge "
                                        r"--raw DIR --out .*old"):
        CremaD(CremadParams(root=str(old))).split("train")


def test_one_epoch_with_augmentation_on_the_device(ogmge_cache, tmp_path, capsys):
    out, _ = ogmge_cache
    code = train_one_epoch(tmp_path, "cremad", out, ("audio", "visual"),
                           extra=("train.augment=device", "train.workers=1"))
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out


def mla_test_list() -> list[str]:
    return read_pinned_list(load_manifest("cremad").flavour("mla"), "test")


def test_interrupted_prepare_resumes_where_it_stopped(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_cremad(raw, train_per_class=2, test_per_class=1)
    original = CremaD.load_sample.__func__
    calls = {"n": 0}

    def stop_at_sixth(cls, source, pipeline):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(cls, source, pipeline)

    monkeypatch.setattr(CremaD, "load_sample", classmethod(stop_at_sixth))
    with pytest.raises(KeyboardInterrupt):  # in this process (workers=1), where the patch counts calls
        prepare("cremad", raw, tmp_path / "c", workers=1, progress=False)
    with pytest.raises(DataError, match="unfinished"):
        Cache(tmp_path / "c")
    monkeypatch.setattr(CremaD, "load_sample", classmethod(original))
    again = prepare("cremad", raw, tmp_path / "c", progress=False)
    assert again.processed == 18 - 5  # the five finished before the interrupt are kept
    prepare("cremad", raw, tmp_path / "fresh", progress=False)
    a, b = Cache(tmp_path / "c"), Cache(tmp_path / "fresh")
    assert a.meta.splits == b.meta.splits
    assert np.array_equal(a.arrays["audio"], b.arrays["audio"])
    assert np.array_equal(a.arrays["visual"], b.arrays["visual"])
