"""UME: the uni-modal ensemble (Du et al., ICML 2023, "On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning").

One unimodal model per modality, each trained alone (its encoder and a linear head, its own
cross-entropy), and the multimodal prediction their ensemble: the mean of their logits
(`combine: logits`, default) or of their softmax probabilities (`combine: probs`; the fused
"logits" are then the log of that mean, whose softmax is the mean and whose argmax decides). The
paper proposes it beside UMT for tasks whose paired (cross-modal) features matter little.

The members (`teachers`, named as UMT's):
- `store` (default): the unimodal runs of the same sweep (Method.requires: per modality m this
  run's config with `method: {name: unimodal, modality: m}`), each at its best validation epoch
  (best.pt), as the paper trains them: separately. This run trains nothing: its steps do no pass
  and record loss 0, each epoch evaluates the same ensemble (so the first epoch is selected), and
  its probes and per-modality accuracies are the members'.
- `in_run`: the members are trained together in this run: a private head per modality on this
  run's encoders, the sum of their cross-entropies (independent gradients: each encoder and head
  gets its own loss's), one backward and one step. Built exactly as joint training's late fusion
  with `late_loss: unimodal` (MLA's "late fusion"), which it equals step for step (tested); it
  differs from `store` in the heads' initial draw, and in that one epoch is selected for all
  members together rather than each at its own best.

Released code: the paper's release could not be found in the code store, and BalanceBenchmark has
no UME; the rule above is the paper's description (an average of separately trained unimodal
models' outputs); which average it uses could not be checked against its text, hence `combine`.

Family: `objective` (BalanceBenchmark's taxonomy, spec/peers.md 1.6): against joint training it
replaces the fused loss by the unimodal ones. Each step reports `loss` and, in_run, `ce.<m>`
(each member's cross-entropy). Cost: store, no pass in training (M forward passes per evaluated
sample); in_run, joint training's: M encoder forwards and one backward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn as nn

from mmbalance.core.params import Strict
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.methods.umt import unimodal_requirements
from mmbalance.models.fusion import build_fusion


class UMEParams(Strict):
    teachers: Literal["store", "in_run"] = "store"
    combine: Literal["logits", "probs"] = "logits"


def ensemble(per_modality: dict[str, torch.Tensor], combine: str) -> torch.Tensor:
    """The members' mean logits, or (probs) the log of their mean softmax probabilities."""
    stacked = torch.stack([logits.float() for logits in per_modality.values()])
    if combine == "logits":
        return stacked.mean(dim=0)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(per_modality))


@METHODS.register("ume")
class UME(Method):
    family = "objective"  # BalanceBenchmark's taxonomy: the unimodal losses replace the fused one
    Params = UMEParams

    @classmethod
    def requires(cls, params: UMEParams, modalities: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return unimodal_requirements(modalities) if params.teachers == "store" else {}

    def __init__(self, params: UMEParams, setup: MethodSetup) -> None:
        if params.teachers == "store":
            members = {m.name: setup.require(m.name) for m in setup.modalities}
            # the members' encoders are this method's: probes and pass counts see them
            setup = dataclasses.replace(setup, encoders=nn.ModuleDict({m: u.encoders[m] for m, u in members.items()}))
        super().__init__(params, setup)
        if params.teachers == "store":
            self.members = nn.ModuleDict(members)
        else:  # as joint training builds late fusion (joint.py), so that the two are the same model
            self.fusion = build_fusion("late", setup.feature_dims(), setup.num_classes)

    def param_groups(self) -> list[dict[str, Any]]:
        return super().param_groups() if self.params.teachers == "in_run" else [{"params": []}]

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        if self.params.teachers == "store":  # trained in their own runs: nothing to do
            ctx.step()  # over no parameters: a no-op the schedule still counts (torch warns otherwise)
            return {"loss": torch.zeros(())}
        ctx.zero_grad()
        with ctx.autocast():
            logits = self.fusion.per_modality(self.encode(batch.inputs))
            losses = {m: self.cross_entropy(z, batch.labels) for m, z in logits.items()}
        loss = sum(losses.values())
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), **{f"ce.{m}": v.detach() for m, v in losses.items()}}

    def per_modality(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.params.teachers == "store":
            return {m: member.predict(batch).fused for m, member in self.members.items()}
        return self.fusion.per_modality(self.encode(batch.inputs))

    def predict(self, batch: Batch) -> Prediction:
        logits = self.per_modality(batch)
        return Prediction(ensemble(logits, self.params.combine), logits)
