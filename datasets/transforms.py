"""Load-time views of cached arrays: frame sampling, crops, flips, noise and normalisation.

Each view turns one cached per-sample array (float16 spectrogram or uint8 frame stack) into the
float32 tensor the encoder sees, and knows that tensor's shape. Randomness comes from torch's
RNG, which the harness seeds per sample.

A view works in two steps (BatchedView): `draw` makes a sample's random choices (frames, crop,
flip, noise) under that sample's seed, and `gather` reads and transforms the rows of a whole
batch at once, writing each into the batch's own array: one copy out of the cache per batch
rather than one per sample and another to stack them. The batch arrays come from `empty`
(np.empty's signature; a split passes a pool that hands out arrays again once no batch uses
them). Calling a view on one row does both steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from mmbalance.datasets.batch_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchView,
    Drawn,
    FrameBatch,
    Region,
    Standardise,
    centre_crop_box,
    on_stored,
    random_crop_box,
    resized_crop_box,
    standardise_,
    to_float32,
)

Empty = Callable[[tuple[int, ...], Any], np.ndarray]  # (shape, dtype) -> an uninitialised array


def segment_indices(count: int, k: int, train: bool) -> list[int]:
    """k frame indices out of `count`: the clip cut into k equal segments, a random frame of each
    in training and each segment's centre at test (how the papers describe their sampling)."""
    step = count / k  # np.linspace(0, count, k + 1)'s points, without its cost per call
    edges = [i * step for i in range(k)] + [float(count)]
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


class BatchedView(ABC):
    """Base of the views: `draw` per sample (under its seed), `gather` per batch (module docstring)."""

    @abstractmethod
    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> Any:
        """A sample's random choices for its row `arr` (`count` real frames; frames resized from `source`)."""

    @abstractmethod
    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[Any], empty: Empty = np.empty) -> torch.Tensor | Drawn:
        """The batch of rows `arrs` under their `draws`, in arrays from `empty`."""

    def __call__(self, arr: np.ndarray, count: int | None = None,
                 source: tuple[int, int] | None = None) -> torch.Tensor | Drawn:
        out = self.gather([arr], [self.draw(arr, count, source)])
        return Drawn(out.frames[0], out.draws[0]) if isinstance(out, Drawn) else out[0]


@dataclass(frozen=True)
class SpectrogramView(BatchedView):
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

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> int | None:
        """The crop's first time frame (None: no crop)."""
        length = arr.shape[self.time_axis]
        if self.crop is None or length <= self.crop:
            return None
        real = length if count is None else max(int(count), self.crop)
        slack = min(real, length) - self.crop
        return int(torch.randint(0, slack + 1, ())) if self.train else slack // 2

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[int | None],
               empty: Empty = np.empty) -> torch.Tensor:
        windows = [self._window(a, start) for a, start in zip(arrs, draws)]
        # one copy of the windows (rows are read-only maps), widened by torch, whose float16
        # conversion is ten times numpy's
        shape = (len(windows), 1, *windows[0].shape)
        stored = torch.from_numpy(empty(shape, np.float16 if self.half else arrs[0].dtype))
        for o, w in zip(stored.numpy(), windows):
            o[0] = w
        if self.half:
            return stored
        x = torch.from_numpy(empty(shape, np.float32)).copy_(stored)
        return standardise_(x, *self.norm) if self.norm is not None else x

    def _window(self, arr: np.ndarray, start: int | None) -> np.ndarray:
        if start is None:
            return arr
        window = [slice(None)] * arr.ndim
        window[self.time_axis] = slice(start, start + self.crop)
        return arr[tuple(window)]


class FrameDraws(NamedTuple):
    """One clip's choices: its frames, the region of the stored frame it shows, its flip, and
    its pixel noise ((k, C, size, size), std applied; None without noise)."""

    indices: list[int]
    region: Region
    flip: bool
    noise: torch.Tensor | None = None


@dataclass(frozen=True)
class FrameClip(BatchedView):
    """(T_slots, H, W, C) uint8 frames with `count` real ones -> (C, k, size, size) float32.

    Training: `crop` = random_resized (RandomResizedCrop, the reference repos' choice), random
    (a plain random crop, DI-MML's UCF) or none (resize only, BalanceBenchmark), one draw for the
    whole clip so frames stay aligned, then a horizontal flip with p = 0.5. Test: resize (or
    centre-crop) to `size`. Then optional Gaussian pixel noise of std `noise_std` on the [0, 1]
    scale (DI-MML's `var`) and normalisation.

    Crops are drawn on the `source` size, the (height, width) the frames had before the prepare
    resized them (the stored size when not given), as torchvision draws them there, and cut from
    the stored frame at the same place in the picture (datasets.batch_views). Here the box is
    rounded to whole stored pixels and resized on uint8, as torchvision resizes a uint8 tensor.
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
        """The per-sample half (frame selection and the draws, uint8) and the batch half (crop,
        flip, noise, normalisation; datasets.batch_views) of this view."""
        batch_fields = {k: getattr(self, k) for k in FrameBatch.__dataclass_fields__}
        return FrameSelect(self), FrameBatch(**batch_fields)

    def region(self, stored: tuple[int, int], source: tuple[int, int] | None) -> Region:
        """The part of the stored frame this sample shows: the crop drawn on the source frame, or
        the whole frame (a resize)."""
        src = source or stored
        if self.train and self.crop == "random_resized":
            return on_stored(resized_crop_box(*src), src, stored)
        if self.train and self.crop == "random":
            return on_stored(random_crop_box(*src, self.size), src, stored)
        if not self.train and self.test_crop == "center":
            return on_stored(centre_crop_box(*src, self.size), src, stored)
        return 0.0, 0.0, float(stored[1]), float(stored[0])

    def choices(self, arr: np.ndarray, count: int | None, source: tuple[int, int] | None) -> FrameDraws:
        """Frames, region and flip, in the order both halves of the view draw them."""
        indices = self.indices(int(count) if count is not None else len(arr))
        region = self.region((arr.shape[1], arr.shape[2]), source)
        return FrameDraws(indices, region, self.train and self.flip and float(torch.rand(())) < 0.5)

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> FrameDraws:
        chosen = self.choices(arr, count, source)
        if self.noise_std > 0 and (self.train or self.noise_at_test):
            noise = torch.randn((self.frames, arr.shape[3], self.size, self.size)).mul_(self.noise_std)
            return chosen._replace(noise=noise)
        return chosen

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[FrameDraws], empty: Empty = np.empty) -> torch.Tensor:
        out = torch.from_numpy(empty((len(arrs), arrs[0].shape[3], self.frames, self.size, self.size), np.float32))
        mean, std = torch.tensor([self.mean, self.std]).view(2, -1, 1, 1, 1)
        for o, arr, d in zip(out, arrs, draws):
            # crop and resize while still uint8: the float conversion then touches only the output
            # pixels, each clip's while it is in the cache
            x = resize_uint8(torch.from_numpy(crop_frames(arr, d.indices, d.region)).permute(0, 3, 1, 2), self.size)
            o.copy_((x.flip(-1) if d.flip else x).permute(1, 0, 2, 3)).div_(255.0)  # C, T, H, W float
            if d.noise is not None:
                o.add_(d.noise.permute(1, 0, 2, 3))
            o.sub_(mean).div_(std)
        return out


def crop_frames(arr: np.ndarray, indices: Sequence[int], region: Region) -> np.ndarray:
    """(T_slots, H, W, C) -> the chosen frames' `region` rounded to whole pixels, (k, h, w, C), a
    copy of those pixels only; zeros where the region leaves the frame (as torchvision pads)."""
    height, width = arr.shape[1:3]
    x1, y1, x2, y2 = (math.floor(v + 0.5) for v in region)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
        return arr[:, y1:y2, x1:x2][indices]
    out = np.zeros((len(indices), y2 - y1, x2 - x1, arr.shape[3]), dtype=arr.dtype)
    top, left = max(y1, 0), max(x1, 0)
    bottom, right = min(y2, height), min(x2, width)
    if bottom > top and right > left:
        out[:, top - y1 : bottom - y1, left - x1 : right - x1] = arr[:, top:bottom, left:right][indices]
    return out


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """(k, C, h, w) uint8 -> (k, C, size, size), antialiased bilinear (torchvision's resize of a
    uint8 tensor: the same kernel and numbers, half the cost per call); as it is if already that
    size. Antialiasing widens the filter only where it shrinks, so an enlargement skips it: the
    same numbers, faster."""
    if x.shape[-2:] == (size, size):
        return x
    shrinks = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=shrinks, align_corners=False)


@dataclass(frozen=True)
class FrameSelect(BatchedView):
    """The per-sample half of a deferred FrameClip: its frames chosen, as stored, and its draws
    -> Drawn((k, H, W, C) uint8, (5,) draws); the layout is changed on the device (FrameBatch)."""

    clip: FrameClip

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return (self.clip.frames, *stored[1:])

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> FrameDraws:
        return self.clip.choices(arr, count, source)

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[FrameDraws], empty: Empty = np.empty) -> Drawn:
        out = empty((len(arrs), self.clip.frames, *arrs[0].shape[1:]), arrs[0].dtype)
        for o, arr, d in zip(out, arrs, draws):
            for slot, index in zip(o, d.indices):
                slot[...] = arr[index]  # one copy, straight into the batch
        return Drawn(torch.from_numpy(out), torch.tensor([[*d.region, float(d.flip)] for d in draws]))
