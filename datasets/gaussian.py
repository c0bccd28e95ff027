"""A tiny Gaussian-prototype generator, for fast unit tests of the harness and methods only.

Linearly separable Gaussian classes show no robust imbalance (the effect needs feature learning
on structured inputs), so this is never a benchmark: it exists to make shapes, gradients and
determinism testable in milliseconds.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mmbalance.core.params import Strict
from mmbalance.core.registry import DATASETS
from mmbalance.core.types import Modality
from mmbalance.datasets.base import Dataset, TensorSplit


class GaussianParams(Strict):
    num_classes: int = Field(4, ge=2)
    dim: int = Field(8, ge=1)
    n_train: int = Field(128, ge=0)
    n_val: int = Field(32, ge=0)
    n_test: int = Field(64, ge=0)
    # distance of the class means from the origin, per modality, in units of the noise std
    separation_audio: float = Field(2.0, ge=0)
    separation_visual: float = Field(1.0, ge=0)
    seed: int = 0


@DATASETS.register("gaussian")
class Gaussian(Dataset):
    Params = GaussianParams
    MODALITIES = ("audio", "visual")
    DEFAULT_ENCODERS = {m: {"name": "mlp", "hidden": 32, "out_dim": 16} for m in MODALITIES}

    def __init__(self, params: GaussianParams) -> None:
        super().__init__(params)
        gen = torch.Generator().manual_seed(params.seed)
        self._means = {
            m: torch.randn(params.num_classes, params.dim, generator=gen) for m in self.MODALITIES
        }
        sizes = {"train": params.n_train, "val": params.n_val, "test": params.n_test}
        self._splits = {name: self._sample(n, gen) for name, n in sizes.items()}

    def _sample(self, n: int, gen: torch.Generator) -> TensorSplit:
        p = self.params
        labels = torch.randint(0, p.num_classes, (n,), generator=gen)
        separation = {m: getattr(p, f"separation_{m}") for m in self.MODALITIES}
        inputs = {
            m: separation[m] * self._means[m][labels] + torch.randn(n, p.dim, generator=gen)
            for m in self.MODALITIES
        }
        return TensorSplit(inputs, labels)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(Modality(m, "vector", (self.params.dim,)) for m in self.MODALITIES)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"class{i}" for i in range(self.params.num_classes))

    def split(self, name: str) -> TensorSplit:
        return self._splits[name]


class Gaussian3Params(GaussianParams):
    separation_text: float = Field(1.5, ge=0)


@DATASETS.register("gaussian3")
class Gaussian3(Gaussian):
    """The Gaussian generator with a third modality, for testing methods with M = 3."""

    Params = Gaussian3Params
    MODALITIES = ("audio", "visual", "text")
    DEFAULT_ENCODERS = {m: {"name": "mlp", "hidden": 32, "out_dim": 16} for m in MODALITIES}
