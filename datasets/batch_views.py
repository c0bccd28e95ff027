"""The batch halves of the views, run once per batch on the training device (GPU augmentation).

With `train.augment: device` (the default on a GPU), a split's per-sample views stop at what is
cheap on the loader's side: frame selection, the spectrogram crop and the uint8 / float16 arrays
as tensors (half the bytes of float32 to pin and copy). What costs per pixel runs here on the
whole batch, where the model is: random resized crop (or random crop), horizontal flip, Gaussian
pixel noise, normalisation. Crops and flips are drawn from torch's CPU generator, which the
harness seeds per run, so they are the same whichever device applies them; pixel noise is drawn
on the device from a seed the CPU generator gives.

The crops resample with `torchvision.ops.roi_align` (aligned, adaptive sampling): for a box the
size of the output it returns the pixels exactly, and when it shrinks it averages
ceil(box / output) samples per output pixel in each direction, which plays the part of the
per-sample path's antialiasing. The two paths agree on every geometric choice (box sampling,
flip, noise, normalisation); their interpolation differs, so `train.augment` is part of the run id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

BatchView = Callable[[torch.Tensor], torch.Tensor]

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults, as the reference repos use them
RATIO = (3 / 4, 4 / 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_boxes(n: int, height: int, width: int, scale: tuple[float, float] = SCALE,
                         ratio: tuple[float, float] = RATIO, attempts: int = 10) -> torch.Tensor:
    """(n, 4) boxes [x1, y1, x2, y2] in pixels, drawn as torchvision's RandomResizedCrop.get_params
    draws one: up to `attempts` (area, log-aspect) tries, the first that fits wins, else a central
    crop at the aspect ratio clamped to `ratio`."""
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 if none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    fw, fh = fallback_size(height, width, ratio)
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.floor(torch.rand(n) * (height - h + 1))
    left = torch.floor(torch.rand(n) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([left, top, left + w, top + h], dim=1)


def fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop (width, height): the whole image, its aspect clamped to `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def random_crop_boxes(n: int, height: int, width: int, size: int) -> torch.Tensor:
    """(n, 4) boxes of size x size at uniform integer offsets (the image is padded to `size` first)."""
    top = torch.floor(torch.rand(n) * (max(height, size) - size + 1))
    left = torch.floor(torch.rand(n) * (max(width, size) - size + 1))
    return torch.stack([left, top, left + size, top + size], dim=1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (boxes, flips, constants) on `device`; to a GPU through pinned memory
    without blocking, because a copy from pageable memory waits for the GPU's queue to drain."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float, (N, 4) boxes -> (N, C, size, size): each image's box resampled."""
    # late: importing torchvision loads torch._dynamo (~1.5 s), which `mmbalance list` need not pay
    from torchvision.ops import roi_align

    rois = to_device(torch.cat([torch.arange(len(x), dtype=boxes.dtype)[:, None], boxes], dim=1), x.device)
    return roi_align(x, rois.to(x.dtype), output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def normalise_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) float in [0, 1] -> (x - mean) / std per channel, in place."""
    stats = to_device(torch.tensor([mean, std], dtype=x.dtype), x.device).view(2, -1, 1, 1)
    return x.sub_(stats[0]).div_(stats[1])


def gaussian_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """N(0, 1) noise drawn on `device` from a generator seeded by torch's CPU RNG: reproducible for
    a run's seed, without drawing (and copying) millions of numbers on the host."""
    if device.type == "cpu":
        return torch.randn(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    return torch.randn(shape, device=device, generator=torch.Generator(device=device).manual_seed(seed))


@dataclass(frozen=True)
class FrameBatch:
    """(B, C, T, H, W) uint8 frames (as FrameSelect leaves them) -> (B, C, T, size, size) float32,
    with FrameClip's augmentation drawn once per clip (all T frames share a crop and a flip)."""

    train: bool
    size: int
    crop: Literal["random_resized", "random", "none"] = "random_resized"
    test_crop: Literal["resize", "center"] = "resize"
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    noise_std: float = 0.0
    noise_at_test: bool = False

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = clips.shape
        x = clips.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).float().div_(255.0)
        x = self._augment(x, b, t) if self.train else self._fit(x)
        if self.noise_std > 0 and (self.train or self.noise_at_test):
            x = x + gaussian_noise(x.shape, x.device) * self.noise_std
        x = normalise_(x, self.mean, self.std)
        return x.reshape(b, t, c, self.size, self.size).permute(0, 2, 1, 3, 4).contiguous()

    def _augment(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.crop == "random_resized":
            x = crop_resize(x, random_resized_boxes(b, h, w).repeat_interleave(t, dim=0), self.size)
        elif self.crop == "random":
            x = F.pad(x, (0, max(self.size - w, 0), 0, max(self.size - h, 0)))  # pad_if_needed
            x = crop_resize(x, random_crop_boxes(b, h, w, self.size).repeat_interleave(t, dim=0), self.size)
        else:
            x = self._fit(x)
        if self.flip:
            flips = to_device((torch.rand(b) < 0.5).repeat_interleave(t), x.device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.test_crop == "center":
            top, left = max((h - self.size) // 2, 0), max((w - self.size) // 2, 0)
            return x[..., top : top + self.size, left : left + self.size]
        if (h, w) == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """The batch half of a spectrogram view: float16 on the wire, float32 for the model."""
    return x.float()


def standardise_(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / std in place, with one mean and std for the whole tensor (a modality's
    dataset statistics); a std of 0 (a constant modality) divides by 1."""
    return x.sub_(mean).div_(std if std > 0 else 1.0)


@dataclass(frozen=True)
class Standardise:
    """The batch half of a normalised spectrogram view: float16 on the wire, then float32
    (x - mean) / std, the same numbers as the per-sample path (float16 -> float32 is exact)."""

    mean: float
    std: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return standardise_(x.to(torch.float32, copy=True), self.mean, self.std)
