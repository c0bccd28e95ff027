"""A unimodal reference: one modality's encoder and a linear head, same backbone and budget.

The third of the three unimodal quantities (with a method's own per-modality accuracy and the
frozen-encoder probes): what that modality reaches when nothing competes with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmbalance.core.errors import ConfigError, allowed_list, closest
from mmbalance.core.params import Strict
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import linear


class UnimodalParams(Strict):
    modality: str


@METHODS.register("unimodal")
class Unimodal(Method):
    family = "reference"
    Params = UnimodalParams

    def __init__(self, params: UnimodalParams, setup: MethodSetup) -> None:
        names = tuple(m.name for m in setup.modalities)
        if params.modality not in names:
            raise ConfigError(
                f"method.modality={params.modality!r} is not a modality of this dataset"
                f"{closest(params.modality, names)}; allowed: {allowed_list(names)}"
            )
        # keep only this modality's encoder: the others would train nothing and cost memory
        own = nn.ModuleDict({params.modality: setup.encoders[params.modality]})
        super().__init__(params, MethodSetup(own, setup.num_classes, setup.modalities))
        self.modality = params.modality
        self.head = linear(setup.encoders[params.modality].out_dim, setup.num_classes)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            loss = self.cross_entropy(self.head(self.encode(batch.inputs)[self.modality]), batch.labels)
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach()}

    def predict(self, batch: Batch) -> Prediction:
        logits = self.head(self.encode(batch.inputs)[self.modality])
        return Prediction(logits, {self.modality: logits})
