"""Checks on the shipped AV-Digits cache and its deterministic generator."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from mmbalance.datasets.prepare import avdigits_generate as gen

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def cache() -> dict[str, np.ndarray]:
    return gen.load_cache(gen.DEFAULT_CACHE)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(gen.DEFAULT_MANIFEST.read_text())


def test_shapes_and_dtypes(cache):
    n = gen.N_SAMPLES
    expected = {
        "images": (np.uint8, (n, 8, 8)),
        "labels": (np.int64, (n,)),
        "waveforms": (np.int16, (n, 8000)),
        "speed": (np.int16, (n,)),
        "pitch": (np.int16, (n,)),
        "train_idx": (np.int64, (1197,)),
        "val_idx": (np.int64, (200,)),
        "test_idx": (np.int64, (400,)),
    }
    for key, (dtype, shape) in expected.items():
        assert cache[key].dtype == dtype, key
        assert cache[key].shape == shape, key
    assert cache["speaker"].dtype.kind == "U" and cache["speaker"].shape == (n,)
    assert cache["images"].max() == 16 and cache["images"].min() == 0
    assert set(np.unique(cache["labels"]).tolist()) == set(range(10))
    assert cache["speed"].min() >= 130 and cache["speed"].max() <= 200
    assert cache["pitch"].min() >= 25 and cache["pitch"].max() <= 75


def test_images_match_sklearn(cache, manifest):
    images, labels = gen.load_digits_arrays()
    assert np.array_equal(cache["images"], images)
    assert np.array_equal(cache["labels"], labels)
    assert gen.images_sha256(cache["images"]) == manifest["images_sha256"]


def test_splits_partition_and_stratified(cache):
    idx = [cache[f"{s}_idx"] for s in SPLITS]
    for a in idx:
        assert np.all(np.diff(a) > 0)  # sorted, no duplicates
    allidx = np.concatenate(idx)
    assert len(allidx) == gen.N_SAMPLES
    assert np.array_equal(np.sort(allidx), np.arange(gen.N_SAMPLES))  # disjoint + covering
    for a in idx:
        assert set(cache["labels"][a].tolist()) == set(range(10))


def test_speakers_disjoint(cache, manifest):
    spk = {s: set(cache["speaker"][cache[f"{s}_idx"]].tolist()) for s in SPLITS}
    for s in SPLITS:
        assert spk[s] <= set(manifest["speakers"][s])
    accents = {s: {x.split("+")[0] for x in spk[s]} for s in SPLITS}
    variants = {s: {x.split("+")[1] for x in spk[s]} for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not spk[a] & spk[b], (a, b)
            assert not accents[a] & accents[b], (a, b)
            assert not variants[a] & variants[b], (a, b)


def test_waveforms_nonsilent(cache):
    rms = np.sqrt((cache["waveforms"].astype(np.float64) ** 2).mean(axis=1))
    assert rms.min() > 100


def test_checksums_match_manifest(cache, manifest):
    assert manifest["version"] == gen.VERSION
    assert manifest["n"] == gen.N_SAMPLES
    assert gen.waveform_sha256(cache["waveforms"]) == manifest["waveform_sha256"]
    for s in SPLITS:
        assert manifest["splits"][s]["n"] == len(cache[f"{s}_idx"])
        assert gen.split_sha256(cache[f"{s}_idx"]) == manifest["splits"][s]["sha256"]


def test_manifest_splits_recomputed_from_sklearn(manifest):
    _, labels = gen.load_digits_arrays()
    splits = gen.assign_splits(labels)
    for s in SPLITS:
        assert len(splits[s]) == gen.SPLIT_SIZES[s]
        assert gen.split_sha256(splits[s]) == manifest["splits"][s]["sha256"]


def test_waveform_codec_roundtrip():
    rng = np.random.default_rng(0)
    w = rng.integers(-32768, 32768, size=(5, 8000), dtype=np.int16)
    w[0] = 32767
    w[1, ::2] = -32768  # extreme deltas exercise int16 wrap-around
    assert np.array_equal(gen.decode_waveforms(gen.encode_waveforms(w), w.shape), w)


def test_params_drawn_before_synthesis_are_deterministic():
    _, labels = gen.load_digits_arrays()
    splits = gen.assign_splits(labels)
    a = gen.draw_utterance_params(splits, labels, seed=0)
    b = gen.draw_utterance_params(splits, labels, seed=0)
    assert a == b


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng not installed; cannot regenerate AV-Digits audio")
def test_regenerate_matches_checksum(tmp_path, manifest):
    version = gen.espeak_version()
    if version != manifest["espeak_ng"]:
        pytest.skip(
            f"espeak-ng {version} installed but the cache was built with espeak-ng "
            f"{manifest['espeak_ng']}; espeak output is only reproducible for the same version"
        )
    t0 = time.perf_counter()
    rebuilt = gen.build(tmp_path / "avdigits.npz")
    elapsed = time.perf_counter() - t0
    print(f"regenerated AV-Digits in {elapsed:.1f} s")
    assert rebuilt["waveform_sha256"] == manifest["waveform_sha256"]
    assert rebuilt["images_sha256"] == manifest["images_sha256"]
    assert rebuilt["splits"] == manifest["splits"]
    assert gen.waveform_sha256(gen.load_cache(tmp_path / "avdigits.npz")["waveforms"]) == manifest["waveform_sha256"]

