"""The built-in datasets as the harness sees them: shapes, splits, noise and dominance knobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmbalance.bench.config import load_config
from mmbalance.bench.train import build_dataset
from mmbalance.datasets.avdigits import AVDigits, AVDigitsParams, add_white_noise, sample_rng
from mmbalance.datasets.cgdigits import CLASS_COLORS, CGDigits, CGDigitsParams


@pytest.fixture(scope="module")
def avdigits() -> AVDigits:
    return AVDigits(AVDigitsParams(preset="audio-dominant"))


def test_avdigits_splits_shapes_and_labels(avdigits):
    sizes = {name: len(avdigits.split(name)) for name in ("train", "val", "test")}
    assert sizes == {"train": 1197, "val": 200, "test": 400}
    train = avdigits.split("train")
    assert train.inputs["audio"].shape == (1197, 1, 24, 32)
    assert train.inputs["visual"].shape == (1197, 1, 8, 8)
    assert [m.shape for m in avdigits.modalities] == [(1, 24, 32), (1, 8, 8)]
    assert avdigits.num_classes == 10
    for name in ("train", "val", "test"):
        assert torch.bincount(avdigits.split(name).labels, minlength=10).min() >= 19  # stratified
    # audio is z-scored with train statistics
    assert train.inputs["audio"].mean().abs() < 1e-4
    assert abs(train.inputs["audio"].std().item() - 1) < 0.01


def test_avdigits_speakers_are_disjoint_between_splits(avdigits):
    speakers = avdigits.arrays["speaker"]
    sets = {name: set(speakers[avdigits.arrays[f"{name}_idx"]]) for name in ("train", "val", "test")}
    assert len(sets["train"]) == 40 and len(sets["val"]) == 10 and len(sets["test"]) == 10
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])


def test_avdigits_noise_is_fixed_per_sample(avdigits):
    again = AVDigits(AVDigitsParams(preset="audio-dominant"))
    for name in ("train", "test"):
        for m in ("audio", "visual"):
            assert torch.equal(avdigits.split(name).inputs[m], again.split(name).inputs[m])
    other_seed = AVDigits(AVDigitsParams(preset="audio-dominant", noise_seed=1))
    assert not torch.equal(avdigits.split("train").inputs["visual"], other_seed.split("train").inputs["visual"])


def test_image_noise_has_the_preset_sigma(avdigits):
    clean = torch.from_numpy(avdigits.arrays["images"][avdigits.arrays["train_idx"]].astype(np.float32) / 16)
    noise = avdigits.split("train").inputs["visual"][:, 0] - clean
    assert abs(noise.std().item() - 0.6) < 0.01
    assert abs(noise.mean().item()) < 0.01


def test_white_noise_snr_matches_request():
    rng = np.random.default_rng(0)
    wave = np.sin(np.linspace(0, 400, 8000)) * 0.3
    for snr in (-6.0, 0.0, 10.0):
        noisy = add_white_noise(wave, snr, rng)
        measured = 10 * np.log10(np.mean(wave**2) / np.mean((noisy - wave) ** 2))
        assert abs(measured - snr) < 0.2
    # the per-sample RNG depends only on (seed, index, stream)
    assert sample_rng(0, 5, 1).random() == sample_rng(0, 5, 1).random()
    assert sample_rng(0, 5, 1).random() != sample_rng(0, 6, 1).random()


def test_presets_resolve_and_explicit_values_win():
    strong = AVDigitsParams(preset="strong-audio-dominant")
    assert (strong.audio_snr_db, strong.image_noise_sigma) == (10.0, 0.6)
    p = AVDigitsParams(preset="visual-dominant", image_noise_sigma=0.1)
    assert (p.audio_snr_db, p.image_noise_sigma) == (-6.0, 0.1)


def test_cgdigits_colour_is_a_shortcut_only_in_train_and_val():
    ds = CGDigits(CGDigitsParams())
    assert [m.name for m in ds.modalities] == ["color", "gray"]
    sizes = {name: len(ds.split(name)) for name in ("train", "val", "test")}
    assert sizes == {"train": 1197, "val": 200, "test": 400}

    def colour_error(split):
        color, labels = split.inputs["color"], split.labels
        # the colour of a pixel is colour * intensity; the brightest pixel of each channel recovers it
        est = color.flatten(2).amax(dim=2).numpy()
        return np.abs(est - CLASS_COLORS[labels.numpy()]).mean()

    assert colour_error(ds.split("train")) < 0.2
    assert colour_error(ds.split("val")) < 0.2
    assert colour_error(ds.split("test")) > 0.25
    gray_noise = ds.split("train").inputs["gray"].std().item()
    assert gray_noise > 0.5  # the gray view carries N(0, 0.5^2) noise on top of the digit


def test_build_dataset_from_config():
    ds = build_dataset(load_config(None, ["dataset.name=cgdigits", "dataset.gray_noise_sigma=0.2"]))
    assert isinstance(ds, CGDigits) and ds.params.gray_noise_sigma == 0.2
