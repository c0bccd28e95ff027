"""`manifest`: own data from a CSV -- prepare, cached values, splits, CSV mistakes, config, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmbalance.bench.cli import main as cli
from mmbalance.bench.config import load_config
from mmbalance.core.errors import ConfigError, DataError
from mmbalance.datasets.cache import Cache
from mmbalance.datasets.manifest import PIPELINES, Manifest, ManifestParams
from mmbalance.datasets.manifest_csv import read_table
from mmbalance.datasets.prepare.runner import prepare
from tests.fixtures.manifest import COLOUR, TONE_HZ, vector_of, write_audio_image, write_csv, write_video_npy
from tests.fixtures.media import read_mark
from tests.fixtures.train import train_one_epoch


@pytest.fixture(scope="module")
def audio_image(tmp_path_factory):
    """(csv path, small-pipeline cache dir, report) of 3 classes x 4 wav+png samples."""
    root = tmp_path_factory.mktemp("own")
    csv_path = write_audio_image(root)
    out = root / "cache"
    return csv_path, out, prepare("manifest", csv_path, out, "small", workers=2, progress=False)


@pytest.fixture(scope="module")
def video_npy(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_video")
    csv_path = write_video_npy(root)
    out = root / "cache"
    return csv_path, out, prepare("manifest", csv_path, out, "small", progress=False)


def mel_bin(freq: float, bins: int, sr: int = 16000, low: float = 20.0) -> int:
    """The Kaldi (HTK) mel filter whose centre is nearest to `freq`."""
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(sr / 2)
    centres = [lo + (k + 1) * (hi - lo) / (bins + 1) for k in range(bins)]
    return int(np.argmin([abs(c - mel(freq)) for c in centres]))


# ---- prepare and the cache ----------------------------------------------------------------------


def test_audio_image_prepare_counts_and_cache(audio_image):
    _, out, report = audio_image
    assert report.counts == {
        "train": {"listed": 6, "prepared": 6, "missing": 0, "corrupt": 0},
        "val": {"listed": 3, "prepared": 3, "missing": 0, "corrupt": 0},
        "test": {"listed": 3, "prepared": 3, "missing": 0, "corrupt": 0},
    }
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == ["cat", "dog", "owl"]
    assert meta.kinds == {"audio": "audio", "image": "image"}
    audio, image = cache.arrays["audio"], cache.arrays["image"]
    assert audio.shape == (12, 128, 64) and audio.dtype == np.float16
    assert image.shape == (12, 1, 64, 64, 3) and image.dtype == np.uint8
    assert cache.counts["image"].tolist() == [1] * 12
    for label in ("cat", "dog", "owl"):
        row = meta.ids.index(f"{label}3")
        assert meta.labels[row] == meta.classes.index(label)
        # uniform png colour survives the resize exactly
        assert image[row, 0].reshape(-1, 3).min(axis=0).tolist() == list(COLOUR[label])
        spec = audio[row].astype(np.float32)
        # 0.8 s gives 1 + (12800 - 400) // 160 = 78 fbank frames, zero-padded to 128
        assert np.all(spec[78:] == 0) and np.all(spec[:78] != 0)
        assert abs(int(np.argmax(spec[:78].mean(axis=0))) - mel_bin(TONE_HZ[label], 64)) <= 1


def test_split_loading_shapes_and_views(audio_image):
    _, out, _ = audio_image
    ds = Manifest(ManifestParams(root=str(out), pipeline="small", frame_size=32))
    assert [(m.name, m.kind, m.shape) for m in ds.modalities] == [
        ("audio", "audio", (1, 128, 64)), ("image", "image", (3, 1, 32, 32))]
    assert ds.class_names == ("cat", "dog", "owl")
    test = ds.split("test")
    assert len(ds.split("train")) == 6 and len(test) == 3
    x, y = test[0]
    assert x["audio"].dtype == torch.float32 and x["audio"].shape == (1, 128, 64)
    assert x["image"].shape == (3, 1, 32, 32)
    assert torch.equal(test[0][0]["image"], test[0][0]["image"])  # test views are deterministic
    assert y == 0  # cat3 comes first in the CSV


def test_video_npy_cache_and_integer_labels(video_npy):
    _, out, report = video_npy
    cache = Cache(out)
    meta = cache.meta
    assert meta.classes == ["1", "2", "10"]  # integers sort as numbers
    assert meta.kinds == {"clip": "video", "feat": "vector"}
    assert cache.arrays["clip"].shape == (9, 10, 64, 64, 3)
    assert cache.arrays["feat"].shape == (9, 8) and cache.arrays["feat"].dtype == np.float16
    for k, label in enumerate((10, 2, 1)):  # class k's clips last k + 2 s at 10 fps
        row = meta.ids.index(f"v{label}_0")
        assert meta.labels[row] == meta.classes.index(str(label))
        n = int(cache.counts["clip"][row])
        assert n == k + 2
        assert [read_mark(cache.arrays["clip"][row, t]) for t in range(n)] == [10 * t for t in range(n)]
        np.testing.assert_allclose(cache.arrays["feat"][row].astype(np.float32), vector_of(label), atol=1e-2)
    assert report.counts["test"]["prepared"] == 3
    ds = Manifest(ManifestParams(root=str(out), pipeline="small"))
    assert [m.shape for m in ds.modalities] == [(3, 3, 64, 64), (8,)]
    x, _ = ds.split("train")[0]
    assert x["clip"].shape == (3, 3, 64, 64) and x["feat"].dtype == torch.float32
    # npy columns are z-scored by the train rows' statistics (v10_0, v2_0, v1_0, as float16)
    train = np.stack([vector_of(label) for label in (10, 2, 1)]).astype(np.float16).astype(np.float64)
    assert meta.stats["feat"] == pytest.approx({"mean": train.mean(), "std": train.std(), "values": 24}, rel=1e-12)
    np.testing.assert_allclose(x["feat"].numpy(), (train[0] - train.mean()) / train.std(), rtol=1e-6)


def test_video_npy_without_split_column(tmp_path):
    csv_path = write_video_npy(tmp_path, per_class=4, split="none")
    report = prepare("manifest", csv_path, tmp_path / "c", "small", progress=False)
    # 12 rows: test round(2.4) = 2, val round(10 / 8) = 1 of the other 10
    assert {s: c["prepared"] for s, c in report.counts.items()} == {"train": 9, "val": 1, "test": 2}
    assert any("70/10/20" in n for n in report.notes)
    assert Cache(tmp_path / "c").meta.kinds == {"clip": "video", "feat": "vector"}


def test_default_pipeline_shapes(tmp_path):
    csv_path = write_audio_image(tmp_path / "raw", per_class=3)
    prepare("manifest", csv_path, tmp_path / "c", progress=False)
    cache = Cache(tmp_path / "c")
    assert cache.meta.pipeline == "default"
    assert cache.arrays["audio"].shape == (9, 1024, 128) and cache.arrays["image"].shape == (9, 1, 224, 224, 3)
    assert PIPELINES["default"].options.video.slots == 10 and PIPELINES["default"].options.video.frames == 3


# ---- splits -------------------------------------------------------------------------------------


def test_no_split_column_carves_70_10_20_per_class(tmp_path):
    write_audio_image(tmp_path, per_class=10, split="none")
    plan = Manifest.plan(tmp_path, PIPELINES["small"])  # --raw DIR holding manifest.csv
    sizes = {s: len(ids) for s, ids in plan.splits.items()}
    assert sizes == {"train": 21, "val": 3, "test": 6}
    label = {s.id: s.label for s in plan.samples}
    for split, per_class in (("val", 1), ("test", 2)):
        assert np.bincount([label[i] for i in plan.splits[split]], minlength=3).tolist() == [per_class] * 3
    assert any("70/10/20" in n and "21/3/6" in n for n in plan.notes)
    assert Manifest.plan(tmp_path, PIPELINES["small"]).splits == plan.splits  # fixed seed


def test_train_test_only_carves_val_from_train(tmp_path):
    csv_path = write_audio_image(tmp_path, per_class=11, split="train_test")
    plan = Manifest.plan(csv_path, PIPELINES["small"])
    assert {s: len(ids) for s, ids in plan.splits.items()} == {"train": 27, "val": 3, "test": 3}
    assert not set(plan.splits["val"]) & set(plan.splits["test"])
    assert any("no val rows" in n and "3 of 30 train rows" in n for n in plan.notes)


def test_too_few_rows_to_carve_says_what_to_do(tmp_path):
    csv_path = write_audio_image(tmp_path, per_class=1, split="none")
    with pytest.raises(DataError, match="too few rows to carve .*add a split column"):
        Manifest.plan(csv_path, PIPELINES["small"])


# ---- CSV mistakes -------------------------------------------------------------------------------

H = ["id", "label", "split", "audio"]


def mistakes_of(tmp_path, header, rows) -> str:
    with pytest.raises(DataError) as err:
        read_table(write_csv(tmp_path / "m.csv", header, rows))
    return str(err.value)


@pytest.mark.parametrize("header, rows, expected", [
    (["id", "audio"], [["a", "a.wav"]], ["line 1, column 'label'", "missing required column 'label'",
                                         "columns found: 'id', 'audio'"]),
    (H, [["a", "x", "train", "a.wav"], ["b", "y", "test", ""]], ["line 3, column 'audio': empty cell"]),
    (H, [["a", "x", "train", "a.wav"], ["b", "y", "test", "b.wav"], ["a", "y", "test", "c.wav"]],
     ["line 4, column 'id'", "duplicate id 'a'", "also on line 2"]),
    (H, [["a", "x", "train", "a.wav"], ["b", "y", "valid", "b.wav"]],
     ["line 3, column 'split'", "unknown split 'valid'", "allowed: train, val, test"]),
    (H, [["a", "x", "train", "a.wav"], ["b", "y", "test", "b.png"]],
     ["line 3, column 'audio'", "'b.png' is an image file", "first file (line 2) is an audio"]),
    (H, [["a", "x", "train", "a.mp3"]], ["line 2, column 'audio'", "extension '.mp3'", ".flac", ".npy", ".wav"]),
    (H, [["a", "1.5", "train", "a.wav"]], ["line 2, column 'label'", "'1.5' is a number but not an integer"]),
    (H, [["a", "x", "train"]], ["line 2: 3 cells, but the header has 4 columns"]),
    (["id", "label", "done"], [["a", "x", "a.wav"]], ["line 1, column 'done'", "not usable as a modality name"]),
    (["id", "label", "split"], [["a", "x", "train"]], ["line 1", "no modality column"]),
    (H, [["a", "x", "train", "a.wav"]], ["column 'split'", "no row has split 'test'"]),
])
def test_each_csv_mistake_names_line_and_column(tmp_path, header, rows, expected):
    message = mistakes_of(tmp_path, header, rows)
    for text in expected:
        assert text in message, message


def test_npy_shapes_that_differ_name_the_first_other_row(tmp_path):
    for name, dim in (("a", 8), ("b", 8), ("c", 5), ("d", 5)):
        np.save(tmp_path / f"{name}.npy", np.zeros(dim, dtype=np.float32))
    message = mistakes_of(tmp_path, ["id", "label", "feat"], [[n, "x", f"{n}.npy"] for n in "abcd"])
    assert "line 4, column 'feat'" in message and "shape (5,)" in message and "line 2's has shape (8,)" in message
    assert "line 5" not in message  # only the first row with the other shape


def test_several_mistakes_in_one_error_capped(tmp_path):
    rows = [["a", "x", "train", "a.wav"], ["a", "y", "dev", "b.mp3"], ["c", "", "test", "c.png"]]
    rows += [[f"e{i}", "x", "test", ""] for i in range(25)]
    message = mistakes_of(tmp_path, H, rows)
    assert "has 30 mistake(s)" in message
    for text in ("line 3, column 'id'", "line 3, column 'split'", "line 3, column 'audio'",
                 "line 4, column 'label'", "line 4, column 'audio': 'c.png' is an image"):
        assert text in message
    assert message.count("\n  line ") == 20 and "... and 10 more" in message


def test_raw_that_is_not_a_csv_or_folder_with_one(tmp_path):
    with pytest.raises(DataError, match="manifest.csv"):
        prepare("manifest", tmp_path, tmp_path / "out", progress=False)


# ---- missing and corrupt files ------------------------------------------------------------------


def test_missing_and_corrupt_files_reported_by_path(tmp_path):
    csv_path = write_audio_image(tmp_path / "raw", per_class=3)
    gone = tmp_path / "raw" / "pictures" / "dog2.png"
    gone.unlink()
    bad = tmp_path / "raw" / "sounds" / "owl0.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DataError, match="missing .*dog2.png"):
        prepare("manifest", csv_path, tmp_path / "failed", "small", on_error="fail", progress=False)
    report = prepare("manifest", csv_path, tmp_path / "skipped", "small", on_error="skip", progress=False)
    assert report.missing == {"dog2": [str(gone)]}
    assert str(bad) in report.corrupt["owl0"]
    assert report.counts["test"] == {"listed": 3, "prepared": 2, "missing": 1, "corrupt": 0}
    assert report.counts["train"]["corrupt"] == 1
    meta = Cache(tmp_path / "skipped").meta
    assert set(meta.skipped) == {"dog2", "owl0"}
    assert sum(len(rows) for rows in meta.splits.values()) == 7
    assert json.loads((tmp_path / "skipped" / "report.json").read_text())["missing"] == {"dog2": [str(gone)]}


# ---- config validation --------------------------------------------------------------------------


def test_config_before_prepare_says_how_to_make_the_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"mmbalance prepare manifest --raw CSV --out DIR.*dataset\.root"):
        load_config(None, ["dataset.name=manifest", f"dataset.root={tmp_path / 'nothing'}"])


def test_config_after_prepare_reads_modalities_and_kinds(audio_image, video_npy):
    _, out, _ = audio_image
    cfg = load_config(None, ["dataset.name=manifest", f"dataset.root={out}", "dataset.pipeline=small"])
    assert list(cfg.model.encoders) == ["audio", "image"]
    assert {m: e["name"] for m, e in cfg.model.encoders.items()} == {"audio": "resnet18", "image": "resnet18"}
    vcfg = load_config(None, ["dataset.name=manifest", f"dataset.root={video_npy[1]}"])
    assert {m: e["name"] for m, e in vcfg.model.encoders.items()} == {"clip": "resnet18", "feat": "mlp"}
    with pytest.raises(ConfigError, match="has no modality 'visual'.*its modalities: audio, image"):
        load_config(None, ["dataset.name=manifest", f"dataset.root={out}", "model.encoders.visual.name=mlp"])
    with pytest.raises(ConfigError, match="unknown 'sound'.*audio, image"):
        load_config(None, ["dataset.name=manifest", f"dataset.root={out}", "dataset.modalities=[sound]"])
    one = load_config(None, ["dataset.name=manifest", f"dataset.root={out}", "dataset.modalities=[image]"])
    assert list(one.model.encoders) == ["image"]


# ---- training through the CLI -------------------------------------------------------------------


def test_prepare_and_one_epoch_through_cli(tmp_path, capsys):
    csv_path = write_audio_image(tmp_path / "raw", per_class=4)
    out = tmp_path / "cache"
    assert cli(["prepare", "manifest", "--raw", str(csv_path), "--out", str(out), "--pipeline", "small"]) == 0
    assert "train listed 6, prepared 6" in capsys.readouterr().out
    code = train_one_epoch(tmp_path, "manifest", out, ("audio", "image"), pipeline="small", batch_size=4)
    assert code == 0, capsys.readouterr().err
    assert "finished" in capsys.readouterr().out
