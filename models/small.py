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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, t = fold_time(x)
        if frames.device.type == "cpu":
            frames = frames.contiguous(memory_format=torch.channels_last)
        return mean_over_time(self.features(frames), t)
