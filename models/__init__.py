"""Encoders (one per modality, identical for every method) and fusion heads."""

from __future__ import annotations

import torch.nn as nn

from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality


def build_encoder(section: dict, modality: Modality) -> nn.Module:
    """An encoder from its resolved config section ({name, ...params}) for one modality."""
    return ENCODERS.create(section, modality, where=f"model.encoders.{modality.name}")
