"""Image encoders on video: frames run one by one through the 2-D network, then mean over time."""

from __future__ import annotations

import torch

from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Modality


def require_image_shape(encoder: str, modality: Modality) -> None:
    if len(modality.shape) not in (3, 4):
        raise ConfigError(
            f"encoder {encoder} needs (C, H, W) or (C, T, H, W) input; modality "
            f"{modality.name!r} has shape {modality.shape}"
        )


def fold_time(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, C, T, H, W) -> (B*T, C, H, W) frames and T; images pass through with T = 0."""
    if x.dim() != 5:
        return x, 0
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t


def mean_over_time(frames: torch.Tensor, t: int) -> torch.Tensor:
    """(B*T, ...) per-frame outputs -> (B, ...) mean over frames (identity when t == 0)."""
    return frames if t == 0 else frames.view(-1, t, *frames.shape[1:]).mean(dim=1)
