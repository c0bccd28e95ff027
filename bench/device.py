"""The training device and what a run does to use it well: the device itself, cuDNN autotuning,
channels_last and optional torch.compile. bf16 autocast lives in methods.base.StepContext."""

from __future__ import annotations

import torch
import torch.nn as nn

from mmbalance.bench.config import TrainConfig
from mmbalance.core.errors import RunFailed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunFailed(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def prepare_model(model: nn.Module, encoders: nn.ModuleDict, cfg: TrainConfig, device: torch.device) -> None:
    """Move `model` to `device`, NHWC where asked on CUDA, and compile its encoders if asked."""
    model.to(device)
    if device.type == "cuda":
        # every batch but an epoch's last has the same shape: autotuning pays off from the first epoch
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for encoder in encoders.values():
            # compile forward only: module hooks (the harness counts passes with one) stay outside
            # the graph, and state_dict keys are unchanged, so checkpoints load either way
            encoder.forward = torch.compile(encoder.forward)
