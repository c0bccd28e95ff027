"""Joint training: both encoders trained by one cross-entropy on fused logits.

The reference baseline of every paper. `model.fusion` picks the head: concat, sum, film, gated
(the first modality, or `model.conditioning`, conditions the other) or late. For late fusion
`late_loss` picks the definition: `unimodal` = the sum of each private head's cross-entropy
(LF-a, MLA's "late fusion"), `fused` = cross-entropy of the averaged logits (LF-b).
"""

from __future__ import annotations

from typing import Literal

import torch

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion


class JointParams(Strict):
    late_loss: Literal["unimodal", "fused"] = "unimodal"


@METHODS.register("joint")
class Joint(Method):
    family = "baseline"
    Params = JointParams

    def __init__(self, params: JointParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.fusion_name = setup.fusion
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        if params.late_loss != "unimodal" and setup.fusion != "late":
            raise ConfigError(
                f"method.late_loss={params.late_loss!r} applies only to model.fusion='late' "
                f"(fusion is {setup.fusion!r}); remove it or set model.fusion=late"
            )

    def loss(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if self.fusion_name == "late" and self.params.late_loss == "unimodal":
            per_modality = self.fusion.per_modality(feats)
            return sum(self.cross_entropy(logits, labels) for logits in per_modality.values())
        return self.cross_entropy(self.fusion(feats), labels)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            loss = self.loss(self.encode(batch.inputs), batch.labels)
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach()}

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
