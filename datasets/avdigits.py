"""AV-Digits: the embedded default dataset.

Each of the 1,797 scikit-learn digit images (8x8) is paired with an espeak-ng utterance of the
digit's name (1 s at 8 kHz), with speaker-disjoint train/val/test voices. Two knobs set which
modality dominates: white noise on the audio at `audio_snr_db` and Gaussian noise of std
`image_noise_sigma` on the image. Noise is drawn once per sample from a seed of its own, so every
method sees identical inputs.

Audio becomes a 24x32 log-mel spectrogram (z-scored per bin with train statistics); images stay
in [0, 1] plus noise. The clean waveforms ship inside the package (datasets/data), so running
this needs no system package; `datasets/prepare/avdigits_generate.py` regenerates them.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchaudio
from pydantic import Field, model_validator

from mmbalance.core.errors import DataError
from mmbalance.core.params import Strict
from mmbalance.core.registry import DATASETS
from mmbalance.core.types import Modality
from mmbalance.datasets.base import SPLITS, Dataset, TensorSplit
from mmbalance.datasets.prepare.avdigits_generate import DEFAULT_CACHE, SAMPLE_RATE, WORDS, load_cache

# (audio SNR in dB, image noise std): measured to give the named dominance with the default
# MLP encoders (see the README's quickstart table)
PRESETS: dict[str, tuple[float, float]] = {
    "audio-dominant": (0.0, 0.6),
    "strong-audio-dominant": (10.0, 0.6),
    "visual-dominant": (-6.0, 0.3),
}
N_MELS, N_FFT, HOP = 24, 512, 256  # 8,000 samples -> 32 frames


class AVDigitsParams(Strict):
    preset: Literal["audio-dominant", "strong-audio-dominant", "visual-dominant"] | None = "audio-dominant"
    # explicit values override the preset's
    audio_snr_db: float | None = None
    image_noise_sigma: float | None = Field(None, ge=0)
    noise_seed: int = 0
    cache: str | None = None  # another cache file (default: the one shipped in the package)

    @model_validator(mode="after")
    def fill_from_preset(self) -> AVDigitsParams:
        if self.preset is None and (self.audio_snr_db is None or self.image_noise_sigma is None):
            raise ValueError("with preset: null, set both audio_snr_db and image_noise_sigma")
        if self.preset is not None:
            snr, sigma = PRESETS[self.preset]
            if self.audio_snr_db is None:
                self.audio_snr_db = snr
            if self.image_noise_sigma is None:
                self.image_noise_sigma = sigma
        return self


def sample_rng(noise_seed: int, index: int, stream: int) -> np.random.Generator:
    """The noise RNG of one sample and modality: independent of split, order and method."""
    return np.random.default_rng([noise_seed, index, stream])


def add_white_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at `snr_db` relative to the clip's mean power."""
    power = float(np.mean(wave**2)) or 1e-12
    return wave + rng.standard_normal(wave.shape) * np.sqrt(power / 10 ** (snr_db / 10))


def log_mel(waves: np.ndarray) -> torch.Tensor:
    """(N, 8000) float waveforms -> (N, 24, 32) log-mel power."""
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    return torch.log(mel(torch.from_numpy(waves).float()) + 1e-6)


@DATASETS.register("avdigits")
class AVDigits(Dataset):
    Params = AVDigitsParams
    PRESETS = PRESETS
    MODALITIES = ("audio", "visual")
    DEFAULT_ENCODERS = {"audio": {"name": "mlp"}, "visual": {"name": "mlp"}}

    def __init__(self, params: AVDigitsParams) -> None:
        super().__init__(params)
        path = Path(params.cache) if params.cache else DEFAULT_CACHE
        if not path.is_file():
            raise DataError(f"dataset 'avdigits': cache file {str(path)!r} (dataset.cache) does not exist")
        self.arrays = load_cache(path)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return (Modality("audio", "audio", (1, N_MELS, 32)), Modality("visual", "image", (1, 8, 8)))

    @property
    def class_names(self) -> tuple[str, ...]:
        return WORDS

    @cached_property
    def _splits(self) -> dict[str, TensorSplit]:
        p, a = self.params, self.arrays
        n = len(a["labels"])
        waves = a["waveforms"].astype(np.float64) / 32768.0
        noisy = np.stack([add_white_noise(waves[i], p.audio_snr_db, sample_rng(p.noise_seed, i, 0)) for i in range(n)])
        audio = log_mel(noisy.astype(np.float32))
        train = torch.from_numpy(a["train_idx"])
        mean, std = audio[train].mean(dim=0), audio[train].std(dim=0).clamp_min(1e-6)
        audio = ((audio - mean) / std).unsqueeze(1)
        images = a["images"].astype(np.float32) / 16.0
        visual = np.stack([
            images[i] + p.image_noise_sigma * sample_rng(p.noise_seed, i, 1).standard_normal((8, 8))
            for i in range(n)
        ]).astype(np.float32)
        visual = torch.from_numpy(visual).unsqueeze(1)
        labels = torch.from_numpy(a["labels"]).long()
        out = {}
        for name in SPLITS:
            idx = torch.from_numpy(a[f"{name}_idx"])
            out[name] = TensorSplit({"audio": audio[idx], "visual": visual[idx]}, labels[idx])
        return out

    def split(self, name: str) -> TensorSplit:
        return self._splits[name]
