"""Fusion heads of the reference repos (OGM-GE, MLA, DI-MML), generalised to named modalities.

Each head maps {modality: feature} to fused logits and, where the head splits cleanly by
modality, gives each modality's own logits (OGM-GE's convention: that modality's block of the
weights plus the bias divided by the number of modalities). FiLM and gated fusion have no clean
split, so they give none; the frozen-encoder probes cover them.

Linear layers are initialised as OGM-GE's `weight_init` does: xavier-normal weights, zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from mmbalance.core.errors import ConfigError

FUSIONS = ("concat", "sum", "film", "gated", "late")


def linear(in_dim: int, out_dim: int) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Fusion(nn.Module):
    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = tuple(dims)

    def per_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return None


class ConcatFusion(Fusion):
    """z = W [f_1; ...; f_M] + b, in the dataset's modality order."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims)
        self.dims = dict(dims)
        self.fc_out = linear(sum(dims.values()), num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc_out(torch.cat([feats[m] for m in self.modalities], dim=1))

    def per_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        bias_share = self.fc_out.bias / len(self.modalities)
        for m in self.modalities:
            block = self.fc_out.weight[:, start : start + self.dims[m]]
            out[m] = feats[m] @ block.t() + bias_share
            start += self.dims[m]
        return out


class SumFusion(Fusion):
    """z = sum_m (W_m f_m + b_m): one linear head per modality, logits added."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims)
        self.heads = nn.ModuleDict({m: linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.heads[m](feats[m]) for m in self.modalities]).sum(dim=0)

    def per_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(self.modalities)
        return {
            m: feats[m] @ self.heads[m].weight.t() + self.heads[m].bias / n for m in self.modalities
        }


class LateFusion(Fusion):
    """A private head per modality; the fused logits are their mean (late fusion)."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims)
        self.heads = nn.ModuleDict({m: linear(d, num_classes) for m, d in dims.items()})

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.per_modality(feats).values())).mean(dim=0)

    def per_modality(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](feats[m]) for m in self.modalities}


class FiLMFusion(Fusion):
    """[gamma; beta] = fc(c); z = fc_out(gamma * x + beta): modality c conditions modality x."""

    def __init__(self, dims: dict[str, int], num_classes: int, conditioning: str) -> None:
        super().__init__(dims)
        self.cond, self.other = conditioning, other_modality(dims, conditioning, "film")
        self.fc = linear(dims[self.cond], 2 * dims[self.other])
        self.fc_out = linear(dims[self.other], num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.fc(feats[self.cond]).chunk(2, dim=1)
        return self.fc_out(gamma * feats[self.other] + beta)


class GatedFusion(Fusion):
    """z = fc_out(sigmoid(fc_x(c)) * fc_y(x)): modality c gates modality x."""

    def __init__(self, dims: dict[str, int], num_classes: int, conditioning: str) -> None:
        super().__init__(dims)
        self.cond, self.other = conditioning, other_modality(dims, conditioning, "gated")
        hidden = dims[self.other]
        self.fc_x = linear(dims[self.cond], hidden)
        self.fc_y = linear(dims[self.other], hidden)
        self.fc_out = linear(hidden, num_classes)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.fc_x(feats[self.cond]))
        return self.fc_out(gate * self.fc_y(feats[self.other]))


def other_modality(dims: dict[str, int], conditioning: str, fusion: str) -> str:
    if len(dims) != 2:
        raise ConfigError(
            f"model.fusion={fusion!r} is defined for exactly 2 modalities; this model has "
            f"{len(dims)}: {', '.join(dims)}; use concat, sum or late"
        )
    return next(m for m in dims if m != conditioning)


def build_fusion(
    name: str, dims: dict[str, int], num_classes: int, conditioning: str | None = None
) -> Fusion:
    """A fusion head over `dims` (modality -> feature size, in the dataset's order).

    For film/gated, `conditioning` defaults to the first modality (audio conditions visual in
    the reference code).
    """
    modalities: Sequence[str] = tuple(dims)
    if name == "concat":
        return ConcatFusion(dims, num_classes)
    if name == "sum":
        return SumFusion(dims, num_classes)
    if name == "late":
        return LateFusion(dims, num_classes)
    cond = conditioning or modalities[0]
    if name == "film":
        return FiLMFusion(dims, num_classes, cond)
    if name == "gated":
        return GatedFusion(dims, num_classes, cond)
    raise ConfigError(f"unknown model.fusion {name!r}; allowed: {', '.join(FUSIONS)}")
