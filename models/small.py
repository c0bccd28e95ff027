"""Small encoders sized for the embedded data: they train at thousands of samples/s on 2 cores."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.params import Strict
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality
from mmbalance.models.frames import fold_time, mean_over_time, require_image_shape
from mmbalance.models.stages import Stages, run_stages


class MLPParams(Strict):
    hidden: int = Field(128, ge=1)
    out_dim: int = Field(64, ge=1)


@ENCODERS.register("mlp")
class MLPEncoder(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear -> ReLU; the feature is the last ReLU's output."""

    Params = MLPParams

    def __init__(self, params: MLPParams, modality: Modality) -> None:
        super().__init__()
        in_dim = math.prod(modality.shape)
        self.out_dim = params.out_dim
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_dim, params.hidden),
            nn.ReLU(),
            nn.Linear(params.hidden, params.out_dim),
            nn.ReLU(),
        )
        # views over self.net's layers, built once (stages() returns the same blocks every time);
        # a plain tuple, so that they add no state_dict keys
        self.blocks = (self.net[:3], self.net[3:])
        self.widths = (params.hidden, params.out_dim)

    def stages(self) -> Stages:
        """(Flatten, Linear, ReLU), (Linear, ReLU); the feature is the second block's output."""
        return Stages(self.blocks, self.widths, no_frames, unpooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def no_frames(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    return x, 0


def unpooled(h: torch.Tensor, t: int) -> torch.Tensor:
    return h


class SmallCNNParams(Strict):
    channels: tuple[int, int] = (16, 32)
    out_dim: int = Field(64, ge=1)
    # the first convolution's stride: 2 halves each side before any full-resolution work, which
    # cost most of a step (conv, batch norm, ReLU and pooling over 16 full-size maps); 1 is the
    # network as it was before issue 15
    stem_stride: int = Field(2, ge=1)


@ENCODERS.register("small_cnn")
class SmallCNNEncoder(nn.Module):
    """Two 3x3 conv blocks (conv, BN, ReLU, 2x2 max-pool), global average pool, Linear, ReLU; the
    first conv has stride `stem_stride` (2 by default: a 32x32 input is 16x16 after it).

    Takes (B, C, H, W); video input (B, C, T, H, W) runs frame by frame and is mean-pooled over
    time, as the ResNet18 of the reference repos does. On CPU the network runs channels-last
    (NHWC), the layout oneDNN's convolutions are fastest in (about 1.5x here); on a GPU the
    layout is the harness's choice (`train.channels_last`).
    """

    Params = SmallCNNParams

    def __init__(self, params: SmallCNNParams, modality: Modality) -> None:
        super().__init__()
        require_image_shape("small_cnn", modality)
        c1, c2 = params.channels
        self.out_dim = params.out_dim
        self.features = nn.Sequential(
            nn.Conv2d(modality.shape[0], c1, 3, stride=params.stem_stride, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c2, params.out_dim),
            nn.ReLU(),
        )
        # views over self.features (two blocks, then the pooling head), built once, in a plain
        # tuple: no state_dict keys of their own
        self.parts = (self.features[:4], self.features[4:8], self.features[8:])
        self.widths = (c1, c2)

    def stages(self) -> Stages:
        """The two conv blocks (conv, BN, ReLU, max-pool); pooled by the average pool, Linear and
        ReLU, then over frames."""
        return Stages(self.parts[:2], self.widths, enter_frames, self.pool)

    def pool(self, h: torch.Tensor, t: int) -> torch.Tensor:
        return mean_over_time(self.parts[2](h), t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)


def enter_frames(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    frames, t = fold_time(x)
    if frames.device.type == "cpu":
        frames = frames.contiguous(memory_format=torch.channels_last)
    return frames, t
