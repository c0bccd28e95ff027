"""Any timm backbone as an encoder: images, frame stacks (video) and spectrograms.

`timm.create_model(model, pretrained=..., in_chans=..., num_classes=0)` gives the pooled
features (no classifier). Input (B, C, H, W) runs as is; video (B, C, T, H, W) runs frame by
frame and is mean-pooled over time, as the reference ResNet18 does; a spectrogram given as
(B, F, T) gets a channel axis, (B, 1, F, T). The reference ResNet18 (`resnet18`) stays the
default: its initialisation is the reference repos', not timm's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.errors import ConfigError, closest
from mmbalance.core.params import Strict
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality
from mmbalance.models.frames import fold_time, mean_over_time


class TimmParams(Strict):
    model: str = Field(min_length=1)  # a timm model name, as in timm.list_models()
    pretrained: bool = False
    in_chans: int | None = Field(None, ge=1)  # None: the modality's channels


def input_channels(modality: Modality) -> int:
    """Channels of (F, T) spectrograms (1), (C, H, W) images and (C, T, H, W) frame stacks."""
    if len(modality.shape) == 2:
        return 1
    if len(modality.shape) in (3, 4):
        return modality.shape[0]
    raise ConfigError(
        f"encoder timm needs (F, T), (C, H, W) or (C, T, H, W) input; modality "
        f"{modality.name!r} has shape {modality.shape}"
    )


def weight_caches() -> str:
    """Where timm looks for pretrained weights: the Hugging Face hub cache, then torch hub's."""
    from huggingface_hub.constants import HF_HUB_CACHE

    torch_hub = Path(torch.hub.get_dir()) / "checkpoints"
    return f"{HF_HUB_CACHE} (set by HF_HOME / HF_HUB_CACHE) or {torch_hub} (set by TORCH_HOME)"


def create_backbone(params: TimmParams, in_chans: int, where: str) -> nn.Module:
    import timm  # here, not at the top: importing timm costs ~0.4 s on every CLI start

    if not timm.is_model(params.model):
        raise ConfigError(
            f"unknown timm model {params.model!r} ({where}.model){closest(params.model, timm.list_models())}; "
            f"the names are timm.list_models()"
        )
    try:
        return timm.create_model(params.model, pretrained=params.pretrained, in_chans=in_chans, num_classes=0)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError: no weights reachable
        if not params.pretrained:
            raise
        raise ConfigError(
            f"timm model {params.model!r} ({where}.pretrained=true): its weights are not cached and "
            f"cannot be downloaded ({type(e).__name__}); timm looks in {weight_caches()}; download "
            f"them there on a machine with internet, or set pretrained: false"
        ) from None


@ENCODERS.register("timm")
class TimmEncoder(nn.Module):
    """A timm backbone (model=<timm name>), pooled features; random init unless pretrained."""

    Params = TimmParams

    def __init__(self, params: TimmParams, modality: Modality) -> None:
        super().__init__()
        where = f"model.encoders.{modality.name}"
        channels = input_channels(modality)
        if params.in_chans not in (None, channels):
            raise ConfigError(
                f"{where}.in_chans={params.in_chans}, but modality {modality.name!r} has {channels} "
                f"channel(s) (shape {modality.shape}); leave in_chans out to take it from the data"
            )
        self.add_channel = len(modality.shape) == 2
        self.net = create_backbone(params, channels, where)
        # timm >= 1.0 names the pooled width head_hidden_size where a head conv follows the
        # trunk (mobilenetv3_small_050: num_features 288, pooled 1024); older timm has only num_features
        self.out_dim = int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, t = fold_time(x.unsqueeze(1) if self.add_channel else x)
        return mean_over_time(self.net(frames), t)
