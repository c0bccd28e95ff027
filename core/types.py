"""The types every layer shares: a modality's spec, a batch, and a method's prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ModalityKind = Literal["audio", "image", "video", "vector", "text"]


@dataclass(frozen=True)
class Modality:
    """One input stream: its name (used everywhere instead of a position), kind and tensor shape."""

    name: str
    kind: ModalityKind
    shape: tuple[int, ...]


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            {m: t.to(device, non_blocking=nb) for m, t in self.inputs.items()},
            self.labels.to(device, non_blocking=nb),
        )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Prediction:
    """Fused logits, and the method's own logits per modality (None where it has no such view)."""

    fused: torch.Tensor
    per_modality: dict[str, torch.Tensor] | None = None
