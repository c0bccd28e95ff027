"""An encoder for feature sequences (B, T, D): CMU-MOSEI's and IEMOCAP's COVAREP, Facet and GloVe frames.

`kind` picks the network:
  transformer  BalanceBenchmark's `Transformer_` encoder for CMU-MOSEI (encoders/
               VisionTransformer_encoder.py): a bias-free 1x1 Conv1d (a Linear) from D to `out_dim`,
               then nn.TransformerEncoder(d_model=out_dim, nhead=`heads`, `layers` layers, feed-forward
               `ff` (torch's default 2048 there), dropout 0.1, post-norm, ReLU), no positional
               encoding; the feature is the last time step's output (`pool: last`, BalanceBenchmark's
               `[-1]`) or the mean over frames (`pool: mean`). BalanceBenchmark: out_dim 1024, 4 heads,
               2 layers; the defaults here are small (64, 4, 1, ff 128) to run fast on a CPU.
  gru, lstm    one recurrent layer of `out_dim` units (MulT-era LSTM baselines, MISA's sLSTMs); the
               feature is the final hidden state.
  mean         the mean frame, then Linear(D, out_dim) and ReLU.

Padding: the MulT pickles pad every sequence to a fixed length with all-zero frames. With
`mask_padding: true` (the default) those frames are left out: the transformer's key-padding mask
and pooling skip them, the recurrent nets run over the real frames only (packed, in their
order), the mean averages only them. A row with no non-zero frame is kept whole. The references
mask nothing (`mask_padding: false` reproduces them); there the last step is still a real frame,
since the unaligned pickles pad at the front.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict
from mmbalance.core.registry import ENCODERS
from mmbalance.core.types import Modality


class SequenceParams(Strict):
    kind: Literal["transformer", "gru", "lstm", "mean"] = "transformer"
    out_dim: int = Field(64, ge=1)  # the transformer's d_model, the recurrent nets' hidden size
    layers: int = Field(1, ge=1)  # transformer layers
    heads: int = Field(4, ge=1)
    ff: int = Field(128, ge=1)  # transformer feed-forward width
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pool: Literal["last", "mean"] = "last"  # transformer only
    mask_padding: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> SequenceParams:
        if self.kind == "transformer" and self.out_dim % self.heads:
            raise ValueError(f"out_dim {self.out_dim} must be a multiple of heads {self.heads} (kind: transformer)")
        return self


@ENCODERS.register("seq")
class SequenceEncoder(nn.Module):
    """(B, T, D) frames -> (B, out_dim) feature; see the module docstring for each `kind`."""

    Params = SequenceParams

    def __init__(self, params: SequenceParams, modality: Modality) -> None:
        super().__init__()
        if len(modality.shape) != 2:
            raise ConfigError(f"encoder seq needs (T, D) feature sequences; modality {modality.name!r} has shape "
                              f"{modality.shape}")
        self.params = params
        self.out_dim = params.out_dim
        d, p = modality.shape[1], params
        if p.kind == "transformer":
            self.proj = nn.Linear(d, p.out_dim, bias=False)  # BalanceBenchmark's Conv1d(k=1, bias=False)
            layer = nn.TransformerEncoderLayer(p.out_dim, p.heads, p.ff, p.dropout, batch_first=True)
            self.net = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        elif p.kind in ("gru", "lstm"):
            self.net = (nn.GRU if p.kind == "gru" else nn.LSTM)(d, p.out_dim, batch_first=True)
        else:
            self.net = nn.Sequential(nn.Linear(d, p.out_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = real_frames(x) if self.params.mask_padding else torch.ones(x.shape[:2], dtype=torch.bool,
                                                                             device=x.device)
        kind = self.params.kind
        if kind == "transformer":
            h = self.net(self.proj(x), src_key_padding_mask=~real)
            return last_real(h, real) if self.params.pool == "last" else masked_mean(h, real)
        if kind == "mean":
            return self.net(masked_mean(x, real))
        return self._recurrent(x, real)

    def _recurrent(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # real frames first, in their order (a stable sort of the padding flags), then packed
        order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
        x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        lengths = real.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.net(packed)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        return h[-1]


def real_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a frame is not all zeros; rows with none are all True (kept whole)."""
    real = x.ne(0).any(dim=-1)
    return real | ~real.any(dim=1, keepdim=True)


def masked_mean(h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    w = real.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


def last_real(h: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each row's output at its last real frame."""
    t = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, t, torch.zeros_like(t)).amax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]
