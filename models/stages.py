"""Encoders cut into their blocks, for methods that act between them (Greedy's MMTM fusion).

An encoder that exposes its stages has a method `stages() -> Stages`: its blocks in order, the
channels (dim 1) each block puts out, how the input enters the first block (video frames folded
into the batch, T frames a sample) and how the last block's output is pooled into the feature
vector. Its `forward` is `run_stages(self.stages(), x)`, so a method that runs the blocks itself,
with its own modules between them, computes what the encoder would where it adds nothing.

The blocks are the encoder's own modules (or containers over them): `stages()` returns the same
objects at every call, so hooks on them (the harness counts passes on `entry_module`) see every
pass, and the encoder's state_dict keys are what they were before it exposed its stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from mmbalance.core.errors import ConfigError
from mmbalance.core.registry import ENCODERS


@dataclass(frozen=True)
class Stages:
    blocks: tuple[nn.Module, ...]
    # channels of each block's output: dim 1 of (N, C, ...) maps, or the width of (N, C) vectors
    widths: tuple[int, ...]
    # input -> (the first block's input, frames per sample T; 0 for inputs that are not video)
    enter: Callable[[torch.Tensor], tuple[torch.Tensor, int]]
    # (the last block's output, T) -> the encoder's feature vector (B, out_dim)
    pool: Callable[[torch.Tensor, int], torch.Tensor]


def run_stages(stages: Stages, x: torch.Tensor) -> torch.Tensor:
    """The encoder's forward pass, block by block."""
    h, t = stages.enter(x)
    for block in stages.blocks:
        h = block(h)
    return stages.pool(h, t)


def has_stages(encoder: nn.Module) -> bool:
    return callable(getattr(encoder, "stages", None))


def staged_encoders() -> list[str]:
    """The registered encoders that expose their stages."""
    return sorted(name for name, cls in ENCODERS.items() if has_stages(cls))


def stages_of(encoder: nn.Module, modality: str, needed_by: str) -> Stages:
    """`encoder.stages()`, or a one-line error naming the encoder and those that have stages."""
    if not has_stages(encoder):
        name = getattr(encoder, "registry_name", type(encoder).__name__)
        raise ConfigError(
            f"{needed_by} runs between the encoders' blocks, but encoder {name!r} (model.encoders.{modality}) "
            f"does not expose its stages; encoders that do: {', '.join(staged_encoders())}"
        )
    return encoder.stages()


def entry_module(encoder: nn.Module) -> nn.Module:
    """The module that every forward pass of `encoder` calls exactly once, however it is run: the
    first block of an encoder with stages (a method may run them without calling the encoder),
    else the encoder itself."""
    return encoder.stages().blocks[0] if has_stages(encoder) else encoder
