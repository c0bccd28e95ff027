"""The types every layer shares: a modality's spec, a batch, and a method's prediction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
    """Inputs by modality and labels. `ids`, where the harness's loader made the batch: each
    sample's position in the pass's list of items, i.e. its row of the split, or, in an epoch whose
    items a method chose (Method.epoch_items), its position in the method's list."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            {m: t.to(device, non_blocking=nb) for m, t in self.inputs.items()},
            self.labels.to(device, non_blocking=nb),
            None if self.ids is None else self.ids.to(device, non_blocking=nb),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies: a DataLoader with `pin_memory=True` calls this on each batch, and
        only from pinned memory does a non-blocking copy to a GPU overlap with its work."""
        return Batch({m: t.pin_memory() for m, t in self.inputs.items()}, self.labels.pin_memory(),
                     None if self.ids is None else self.ids.pin_memory())

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        """One batch of `batches`' samples in order; ids kept where every part has them."""
        if len(batches) == 1:
            return batches[0]
        ids = [b.ids for b in batches]
        return Batch({m: torch.cat([b.inputs[m] for b in batches]) for m in batches[0].inputs},
                     torch.cat([b.labels for b in batches]), None if any(i is None for i in ids) else torch.cat(ids))

    def rows(self, index: torch.Tensor) -> Batch:
        """The samples at `index` (indices or a boolean mask), with their ids where it has them."""
        return Batch({m: x[index] for m, x in self.inputs.items()}, self.labels[index],
                     None if self.ids is None else self.ids[index.to(self.ids.device)])


@dataclass
class Prediction:
    """Fused logits, the method's own logits per modality (None where it has no such view), and
    `logs`: quantities the method wants logged at evaluation (MLA's fusion weights, say), each one
    number for the batch (a 0-dim tensor: a mean over the batch's samples, or a per-batch value).
    The harness averages each over the split, weighted by batch size, and records validation's in
    the epoch record (metrics.jsonl, under `method`)."""

    fused: torch.Tensor
    per_modality: dict[str, torch.Tensor] | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
