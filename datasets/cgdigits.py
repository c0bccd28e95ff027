"""CG-Digits: the coloured-and-gray MNIST scenario (greedy learner, PMR) on scikit-learn digits.

Two views of the same digit. `color`: the digit painted in its class's colour plus jitter
(variance `color_jitter_var`) in train and val, but in a uniformly random colour at test, so the
colour is a shortcut that stops working. `gray`: the gray digit plus Gaussian noise of std
`gray_noise_sigma`. The shortcut modality is learned fast and starves the gray encoder
(on 2 cores, joint training lands below both unimodal models). Val follows the training
distribution: selection cannot see the shift, as in practice. Splits are AV-Digits' (same images in each split).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.params import Strict
from mmbalance.core.registry import DATASETS
from mmbalance.core.types import Modality
from mmbalance.datasets.base import SPLITS, Dataset, TensorSplit
from mmbalance.datasets.prepare.avdigits_generate import WORDS, assign_splits, load_digits_arrays

# ten well-separated RGB class colours (tab10)
CLASS_COLORS = np.array([
    [0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
    [0.58, 0.40, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.50, 0.50, 0.50],
    [0.74, 0.74, 0.13], [0.09, 0.75, 0.81],
])


class CGDigitsParams(Strict):
    color_jitter_var: float = Field(0.03, ge=0)
    gray_noise_sigma: float = Field(0.5, ge=0)
    noise_seed: int = 0


@DATASETS.register("cgdigits")
class CGDigits(Dataset):
    Params = CGDigitsParams
    MODALITIES = ("color", "gray")
    DEFAULT_ENCODERS = {"color": {"name": "mlp"}, "gray": {"name": "mlp"}}

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return (Modality("color", "image", (3, 8, 8)), Modality("gray", "image", (1, 8, 8)))

    @property
    def class_names(self) -> tuple[str, ...]:
        return WORDS

    @cached_property
    def _splits(self) -> dict[str, TensorSplit]:
        p = self.params
        images, labels = load_digits_arrays()
        images = images.astype(np.float32) / 16.0
        rng = np.random.default_rng(p.noise_seed)
        out = {}
        for name, idx in assign_splits(labels).items():
            if name == "test":
                colors = rng.uniform(0, 1, (len(idx), 3))
            else:
                jitter = rng.normal(0, np.sqrt(p.color_jitter_var), (len(idx), 3))
                colors = np.clip(CLASS_COLORS[labels[idx]] + jitter, 0, 1)
            color = colors[:, :, None, None] * images[idx][:, None]
            gray = images[idx][:, None] + p.gray_noise_sigma * rng.standard_normal((len(idx), 1, 8, 8))
            out[name] = TensorSplit(
                {"color": torch.from_numpy(color.astype(np.float32)),
                 "gray": torch.from_numpy(gray.astype(np.float32))},
                torch.from_numpy(labels[idx]),
            )
        assert set(out) == set(SPLITS)
        return out

    def split(self, name: str) -> TensorSplit:
        return self._splits[name]
