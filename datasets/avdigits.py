"""AV-Digits: the embedded default dataset.

Each of the 1,797 scikit-learn digit images (8x8) is paired with an espeak-ng utterance of the
digit's name (1 s at 8 kHz), with speaker-disjoint train/val/test voices. Two knobs set which
modality dominates: white noise on the audio at `audio_snr_db` and Gaussian noise of std
`image_noise_sigma` on the image. Noise is drawn once per sample from a seed of its own, so every
method sees identical inputs.

Audio becomes a 24x32 log-mel spectrogram (z-scored per bin with train statistics); images stay
in [0, 1] plus noise. The clean waveforms ship inside the package (datasets/data), so running
this needs no system package; `datasets/prepare/avdigits_generate.py` regenerates them.

Three-modality presets add `text`: a caption of the digit from a fixed 33-word vocabulary (two
clue phrases such as "seven", "odd", "after six" among filler words, 8 token ids;
`datasets/prepare/avdigits_captions.py`), each token replaced by a random word with probability
`text_noise`. With `text_noise` unset (the two-modality presets) there is no text modality and
everything else (data, config, run ids) is as it was before text existed.
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
from mmbalance.datasets.prepare.avdigits_captions import CAPTION_LENGTH, VOCAB, add_token_noise, draw_captions
from mmbalance.datasets.prepare.avdigits_generate import DEFAULT_CACHE, SAMPLE_RATE, WORDS, load_cache

# (audio SNR in dB, image noise std, text token noise or None for no text modality): measured to
# give the named dominance with the default encoders (see the README's quickstart tables)
PRESETS: dict[str, tuple[float, float, float | None]] = {
    "audio-dominant": (0.0, 0.6, None),
    "strong-audio-dominant": (10.0, 0.6, None),
    "visual-dominant": (-6.0, 0.3, None),
    "three-modality": (0.0, 0.6, 0.1),
}
PresetName = Literal["audio-dominant", "strong-audio-dominant", "visual-dominant", "three-modality"]
N_MELS, N_FFT, HOP = 24, 512, 256  # 8,000 samples -> 32 frames


class AVDigitsParams(Strict):
    preset: PresetName | None = "audio-dominant"
    # explicit values override the preset's
    audio_snr_db: float | None = None
    image_noise_sigma: float | None = Field(None, ge=0)
    # probability that a caption token is replaced by a random word; None: no text modality (and
    # left out of the config, so that two-modality configs and their run ids are as before text)
    text_noise: float | None = Field(None, ge=0, le=1, exclude_if=lambda v: v is None)
    noise_seed: int = 0
    cache: str | None = None  # another cache file (default: the one shipped in the package)

    @model_validator(mode="after")
    def fill_from_preset(self) -> AVDigitsParams:
        if self.preset is None and (self.audio_snr_db is None or self.image_noise_sigma is None):
            raise ValueError("with preset: null, set both audio_snr_db and image_noise_sigma")
        if self.preset is not None:
            snr, sigma, text = PRESETS[self.preset]
            if self.audio_snr_db is None:
                self.audio_snr_db = snr
            if self.image_noise_sigma is None:
                self.image_noise_sigma = sigma
            if self.text_noise is None and text is not None:  # (assigning None would re-validate forever)
                self.text_noise = text
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


def noisy_captions(labels: np.ndarray, noise: float, noise_seed: int) -> torch.Tensor:
    """Every sample's caption (int64 token ids, (N, CAPTION_LENGTH)) with its own token noise."""
    clean = draw_captions(labels)
    return torch.from_numpy(np.stack([add_token_noise(clean[i], noise, sample_rng(noise_seed, i, 2))
                                      for i in range(len(labels))]))


@DATASETS.register("avdigits")
class AVDigits(Dataset):
    Params = AVDigitsParams
    PRESETS = PRESETS
    MODALITIES = ("audio", "visual", "text")  # every one it can have: text only with text_noise set
    DEFAULT_ENCODERS = {"audio": {"name": "mlp"}, "visual": {"name": "mlp"},
                        "text": {"name": "text", "vocab_size": len(VOCAB)}}

    def __init__(self, params: AVDigitsParams) -> None:
        super().__init__(params)
        path = Path(params.cache) if params.cache else DEFAULT_CACHE
        if not path.is_file():
            raise DataError(f"dataset 'avdigits': cache file {str(path)!r} (dataset.cache) does not exist")
        self.arrays = load_cache(path)

    @classmethod
    def modality_names(cls, params: AVDigitsParams | None = None) -> tuple[str, ...]:
        has_text = params is not None and params.text_noise is not None
        return cls.MODALITIES if has_text else cls.MODALITIES[:2]

    @property
    def modalities(self) -> tuple[Modality, ...]:
        specs = (Modality("audio", "audio", (1, N_MELS, 32)), Modality("visual", "image", (1, 8, 8)),
                 Modality("text", "text", (CAPTION_LENGTH,)))
        return specs[:len(self.modality_names(self.params))]

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
        inputs = {"audio": audio, "visual": torch.from_numpy(visual).unsqueeze(1)}
        if p.text_noise is not None:
            inputs["text"] = noisy_captions(a["labels"], p.text_noise, p.noise_seed)
        labels = torch.from_numpy(a["labels"]).long()
        out = {}
        for name in SPLITS:
            idx = torch.from_numpy(a[f"{name}_idx"])
            out[name] = TensorSplit({m: x[idx] for m, x in inputs.items()}, labels[idx])
        return out

    def split(self, name: str) -> TensorSplit:
        return self._splits[name]
