"""Crop geometry shared by the two halves of the frame views, and the batch halves, run once per
batch on the training device (GPU augmentation).

Crops are drawn per sample, under the sample's own seed, by torchvision's own procedure
(`RandomResizedCrop.get_params`, `RandomCrop`'s offsets, `CenterCrop`'s rounding) on the frame
size the reference code crops from: the size the frames had before the prepare stored them
(the cache keeps it per row). The box is then scaled onto the stored frame, so the crop covers
the region of the picture the reference's crop covers, whatever size the cache stores.

With `train.augment: device` (the default on a GPU), a split's per-sample views stop at what is
cheap on the loader's side: frame selection, the crop and flip draws, the spectrogram crop and
the uint8 / float16 arrays as tensors (half the bytes of float32 to pin and copy). What costs
per pixel runs here on the whole batch, where the model is: the crops, horizontal flips,
Gaussian pixel noise, normalisation. The draws travel beside the frames (`draws_key`), so a
sample is cropped the same whichever device applies it; pixel noise is drawn on the device from
a seed the CPU generator gives.

The crops resample with `torchvision.ops.roi_align` (aligned, adaptive sampling): for a box the
size of the output it returns the pixels exactly, and when it shrinks it averages
ceil(box / output) samples per output pixel in each direction, which plays the part of the
per-sample path's antialiasing; it samples the box's exact (fractional) edges, where the
per-sample path crops whole stored pixels. The two paths agree on every geometric choice (box,
flip, noise, normalisation); their interpolation differs, so `train.augment` is part of the run id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

BatchView = Callable[..., torch.Tensor]
Box = tuple[int, int, int, int]  # top, left, height, width in pixels, as torchvision's crop params
Region = tuple[float, float, float, float]  # x1, y1, x2, y2 on the stored frame (fractional pixels)

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults, as the reference repos use them
RATIO = (3 / 4, 4 / 3)
LOG_RATIO = tuple(torch.log(torch.tensor(RATIO)).tolist())  # as get_params computes them (float32)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def draws_key(modality: str) -> str:
    """The batch input under which a modality's per-sample draws (Drawn.draws) travel to its batch half."""
    return f"{modality}.draws"


class Drawn(NamedTuple):
    """A per-sample half's output: the chosen frames as stored, and (5,) draws: the crop region
    [x1, y1, x2, y2] on the stored frame and 1.0 for a horizontal flip (0.0 for none)."""

    frames: torch.Tensor
    draws: torch.Tensor


def resized_crop_box(height: int, width: int, scale: tuple[float, float] = SCALE,
                     ratio: tuple[float, float] = RATIO) -> Box:
    """torchvision's RandomResizedCrop.get_params on a height x width image, line for line: the
    same draws from torch's RNG, so a seed gives torchvision's box. Up to 10 (area, log-aspect)
    tries, the first that fits wins, else a central crop at the aspect ratio clamped to `ratio`."""
    area = height * width
    log_ratio = LOG_RATIO if ratio == RATIO else tuple(torch.log(torch.tensor(ratio)).tolist())
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_crop_box(height: int, width: int, size: int) -> Box:
    """torchvision's RandomCrop(size, pad_if_needed=True) offsets, with its draws: a side shorter
    than `size` is padded by the shortfall on both ends first, so `top` / `left` can be negative."""
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    top = int(torch.randint(0, height + 2 * pad_h - size + 1, size=())) if height + 2 * pad_h > size else 0
    left = int(torch.randint(0, width + 2 * pad_w - size + 1, size=())) if width + 2 * pad_w > size else 0
    return top - pad_h, left - pad_w, size, size


def centre_crop_box(height: int, width: int, size: int) -> Box:
    """torchvision's CenterCrop(size) box (its rounding; negative offsets where it pads)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0)), size, size


def on_stored(box: Box, source: tuple[int, int], stored: tuple[int, int]) -> Region:
    """A box on the source frame -> the same part of the picture on the stored frame, which the
    prepare resized from source=(height, width) to stored=(height, width)."""
    top, left, h, w = box
    sy, sx = stored[0] / source[0], stored[1] / source[1]
    return left * sx, top * sy, (left + w) * sx, (top + h) * sy


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (boxes, flips, constants) on `device`; to a GPU through pinned memory
    without blocking, because a copy from pageable memory waits for the GPU's queue to drain."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float, (N, 4) boxes [x1, y1, x2, y2] -> (N, C, size, size): each image's box resampled."""
    # late: importing torchvision loads torch._dynamo (~1.5 s), which `mmbalance list` need not pay
    from torchvision.ops import roi_align

    index = torch.arange(len(x), dtype=boxes.dtype, device=boxes.device)[:, None]
    rois = torch.cat([index, boxes], dim=1).to(x.device, x.dtype)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


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
    """(B, T, H, W, C) uint8 frames and (B, 5) draws (as FrameSelect leaves them) ->
    (B, C, T, size, size) float32: FrameClip's augmentation, one crop and flip per clip."""

    train: bool
    size: int
    crop: Literal["random_resized", "random", "none"] = "random_resized"
    test_crop: Literal["resize", "center"] = "resize"
    flip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    noise_std: float = 0.0
    noise_at_test: bool = False

    def __call__(self, clips: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = clips.shape
        # the stored layout to (B*T, C, H, W) here, on the device, rather than per sample in the loader
        x = clips.reshape(b * t, h, w, c).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        cropped = self.crop != "none" if self.train else self.test_crop == "center"
        x = crop_resize(x, draws[:, :4].repeat_interleave(t, dim=0), self.size) if cropped else self._fit(x)
        if self.train and self.flip:
            flips = (draws[:, 4] > 0.5).to(x.device).repeat_interleave(t)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        if self.noise_std > 0 and (self.train or self.noise_at_test):
            x = x + gaussian_noise(x.shape, x.device) * self.noise_std
        x = normalise_(x, self.mean, self.std)
        return x.reshape(b, t, c, self.size, self.size).permute(0, 2, 1, 3, 4).contiguous()

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
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
