"""A small text encoder trained from scratch, sized for the embedded data's captions (AV-Digits'
`text`: 8 token ids from a 33-word vocabulary): it trains at thousands of samples/s on 2 cores.

Token ids (B, L), id 0 the padding -> embedding -> pooled over the tokens -> Linear -> ReLU; the
feature is the last ReLU's output, as the MLP encoder's is. Pooling:
- `mean`: the mean of the non-padding tokens' embeddings (a bag of words; blind to order);
- `gru`: a one-layer GRU over the embeddings, its last hidden state (reads order: "after six").
A caption that is all padding (a method's zeroed input) pools to zeros under `mean`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality


class TextParams(Strict):
    vocab_size: int = Field(ge=2)  # including the padding id 0 (datasets give theirs as the default)
    embed_dim: int = Field(32, ge=1)
    pool: Literal["mean", "gru"] = "mean"
    hidden: int = Field(64, ge=1)  # the GRU's width (pool: gru)
    out_dim: int = Field(64, ge=1)


@ENCODERS.register("text")
class TextEncoder(nn.Module):
    """Embedding (id 0 padding), mean or GRU pooling over tokens, Linear, ReLU."""

    Params = TextParams

    def __init__(self, params: TextParams, modality: Modality) -> None:
        super().__init__()
        if modality.kind != "text" or len(modality.shape) != 1:
            raise ConfigError(f"encoder 'text' (model.encoders.{modality.name}) reads token ids of shape (L,); "
                              f"modality {modality.name!r} is {modality.kind} of shape {tuple(modality.shape)}")
        self.out_dim = params.out_dim
        self.embed = nn.Embedding(params.vocab_size, params.embed_dim, padding_idx=0)
        self.gru = nn.GRU(params.embed_dim, params.hidden, batch_first=True) if params.pool == "gru" else None
        width = params.hidden if self.gru is not None else params.embed_dim
        self.head = nn.Sequential(nn.Linear(width, params.out_dim), nn.ReLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        if self.gru is not None:
            return self.head(self.gru(e)[1][0])
        return self.head(mean_of_tokens(e, tokens != 0))


def mean_of_tokens(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) embeddings -> (B, D): the mean over the positions where `mask` (B, L) holds;
    zeros where it holds nowhere."""
    m = mask.unsqueeze(-1).to(e.dtype)
    return (e * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
