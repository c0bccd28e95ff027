"""Load-time views of cached arrays: frame sampling, crops, flips, noise and normalisation.

Each view turns one cached per-sample array (float16 spectrogram or uint8 frame stack) into the
float32 tensor the encoder sees, and knows that tensor's shape. Randomness comes from torch's
RNG, which the harness seeds per run (and per DataLoader worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from mmbalance.datasets.batch_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchView,
    FrameBatch,
    Standardise,
    normalise_,
    standardise_,
    to_float32,
)


def segment_indices(count: int, k: int, train: bool) -> list[int]:
    """k frame indices out of `count`: the clip cut into k equal segments, a random frame of each
    in training and each segment's centre at test (how the papers describe their sampling)."""
    edges = np.linspace(0, count, k + 1)
    if train:
        picks = [lo + float(torch.rand(())) * (hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]
    else:
        picks = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    return [min(int(p), count - 1) for p in picks]


def window_indices(count: int, k: int, train: bool) -> list[int]:
    """k consecutive frame indices: a random offset in training, the centred window at test;
    clips shorter than k repeat their last frame."""
    offset_max = max(count - k, 0)
    offset = int(torch.randint(0, offset_max + 1, ())) if train else offset_max // 2
    return [min(offset + i, count - 1) for i in range(k)]


@dataclass(frozen=True)
class SpectrogramView:
    """A stored float16 spectrogram -> (1, *shape) float32.

    Optionally a `crop` of that many time frames (random in training, centred at test; within
    the first `count` frames when the cache keeps a frame count) and a normalisation
    `norm=(mean, std)`: x -> (x - mean) / std. Time runs along `time_axis`: 1 for (F, T)
    spectrograms (the papers' datasets), 0 for (T, F) ones (fbank, the manifest's features).
    """

    train: bool
    crop: int | None = None
    half: bool = False  # keep float16 (the deferred view; the batch half casts on the device)
    time_axis: Literal[0, 1] = 1
    norm: tuple[float, float] | None = None

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        shape = list(stored)
        shape[self.time_axis] = self.crop or stored[self.time_axis]
        return (1, *shape)

    def deferred(self) -> tuple[SpectrogramView, BatchView]:
        """The per-sample half (crop, float16) and the batch half (to float32, normalised) of this view."""
        return replace(self, half=True), Standardise(*self.norm) if self.norm else to_float32

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        # a copy: rows are read-only maps
        x = torch.from_numpy(np.array(arr, dtype=np.float16 if self.half else np.float32))
        if self.crop is not None and x.shape[self.time_axis] > self.crop:
            real = x.shape[self.time_axis] if count is None else max(int(count), self.crop)
            slack = min(real, x.shape[self.time_axis]) - self.crop
            start = int(torch.randint(0, slack + 1, ())) if self.train else slack // 2
            x = x.narrow(self.time_axis, start, self.crop)
        if self.norm is not None and not self.half:
            x = standardise_(x, *self.norm)
        return x.unsqueeze(0)


@dataclass(frozen=True)
class FrameClip:
    """(T_slots, H, W, C) uint8 frames with `count` real ones -> (C, k, size, size) float32.

    Training: `crop` = random_resized (RandomResizedCrop, the reference repos' choice), random
    (a plain random crop, DI-MML's UCF) or none (resize only, BalanceBenchmark), one draw for the
    whole clip so frames stay aligned, then a horizontal flip with p = 0.5. Test: resize (or
    centre-crop) to `size`. Then optional Gaussian pixel noise of std `noise_std` on the [0, 1]
    scale (DI-MML's `var`) and normalisation.
    """

    train: bool
    frames: int
    size: int
    sampling: Literal["segments", "window"] = "segments"
    crop: Literal["random_resized", "random", "none"] = "random_resized"
    test_crop: Literal["resize", "center"] = "resize"
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    noise_std: float = 0.0
    noise_at_test: bool = False

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return (stored[3], self.frames, self.size, self.size)

    def indices(self, count: int) -> list[int]:
        pick = segment_indices if self.sampling == "segments" else window_indices
        return pick(count, self.frames, self.train)

    def deferred(self) -> tuple[FrameSelect, BatchView]:
        """The per-sample half (frame selection, uint8) and the batch half (crop, flip, noise,
        normalisation; datasets.batch_views) of this view."""
        batch_fields = {k: getattr(self, k) for k in FrameBatch.__dataclass_fields__}
        return FrameSelect(self), FrameBatch(**batch_fields)

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        x = select_frames(arr, count, self.indices)  # T, C, H, W uint8
        # crop and resize while still uint8: the float conversion then touches only the output pixels
        x = self._augment(x) if self.train else self._fit(x)
        x = x.float().div_(255.0)
        if self.noise_std > 0 and (self.train or self.noise_at_test):
            x = x + torch.randn_like(x) * self.noise_std
        return normalise_(x, self.mean, self.std).permute(1, 0, 2, 3).contiguous()  # C, T, H, W

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        # late: importing torchvision loads torch._dynamo (~1.5 s), which `mmbalance list` need not pay
        from torchvision.transforms import v2

        if self.crop == "random_resized":
            x = v2.RandomResizedCrop(self.size, antialias=True)(x)
        elif self.crop == "random":
            x = v2.RandomCrop(self.size, pad_if_needed=True)(x)
        else:
            x = self._fit(x)
        if self.flip and float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        return x

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2  # late: see _augment

        if self.test_crop == "center":
            return v2.CenterCrop(self.size)(x)
        if x.shape[-2:] == (self.size, self.size):
            return x
        return v2.functional.resize(x, [self.size, self.size], antialias=True)


def select_frames(arr: np.ndarray, count: int | None, indices: Any) -> torch.Tensor:
    """(T_slots, H, W, C) uint8 with `count` real frames -> the chosen (k, C, H, W) uint8 frames."""
    n = int(count) if count is not None else len(arr)
    return torch.from_numpy(np.ascontiguousarray(arr[indices(n)])).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class FrameSelect:
    """The per-sample half of a deferred FrameClip: its frames chosen, as stored -> (C, k, H, W) uint8."""

    clip: FrameClip

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return (stored[3], self.clip.frames, stored[1], stored[2])

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        return select_frames(arr, count, self.clip.indices).permute(1, 0, 2, 3).contiguous()
