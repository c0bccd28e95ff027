"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang & Hu, ICASSP 2023, arXiv 2303.05338).

Released code: GeWu-Lab/MMCosine_ICASSP23 @ 00ba0a9cbd9b, main_CD.py (`train_epoch` l.90-152,
`valid` l.155-217; the model is models/basic_model.py `AVClassifier` with the concat head of
models/fusion_modules.py `ConcatFusion`, `fc_out` over [a; v]). Second reference: BalanceBenchmark
(GeWu-Lab/BalanceBenchmark @ 4c1482fca5aa, balancemm/trainer/MMCosine_trainer.py `training_step`
l.92-137, `validation_step` l.208-248).

The model is joint training's: one encoder per modality and a linear fusion head, trained by one
cross-entropy, one backward, one step. MMCosine changes only the logits the loss sees. Each
modality m has its block W_m of the head's weights (concat: the columns of `fc_out` over f_m; sum
fusion: that modality's own head); its logits are the cosine of its feature with each class's
weight row, times a scale s:

    z_m = s * normalize(f_m) @ normalize(W_m, rows)^T      (`cosine_logits`)
    z   = sum_m z_m                                        the bias is not used
    L   = CE(z, y)

(main_CD.py l.113-118 and l.141; the code normalises W_m^T along dim 0, i.e. each class's row of
W_m.) Normalising both sides takes away the feature and weight norms through which the dominant
modality outgrows the other in the fused logits, so each modality's logit lies in [-s, s].

Evaluation, where the two codes differ (`fused_eval`):
- `linear` (the release, default): `valid` (l.181-198) scores the fused prediction with the
  model's own output, fc_out([a; v]) WITH its bias: the plain linear head the cosine loss trained
  (through its weights; its bias gets no gradient, only weight decay).
- `cosine` (BalanceBenchmark's validation_step l.224-237): the fused prediction is z = sum_m z_m,
  as in training.
Both score each modality by its cosine logits z_m (the release's "approximate uni-modal
evaluation", l.184-189), which is the per-modality view `predict` returns.

Switches and the other differences:
- `cosine` (the release's --mmcosine flag, default on): off, the step is joint training's (the
  release's else branch l.119-123 only changes the logged per-modality logits).
- `modulation_starts`/`modulation_ends` (BalanceBenchmark's window, inclusive, 0-based epochs; its
  config 0-80): outside it the loss is the plain CE of the linear head, as its trainer's else
  branch l.133-134. The release has no window (`modulation_ends: null`, the default: to the end).
- `scaling`: the release's argparse default and README command use 10, BalanceBenchmark's config 15.
- Not implemented: the release's NCE term (`--lam`, l.110 and l.141, default 0: "used in the
  supplementary material"), and its FiLM/gated heads, which differ from the suite's (they modulate
  both modalities and concatenate); here `model.fusion` must be concat or sum, anything else is
  refused. For M >= 3 the head is split into one block per modality, as BalanceBenchmark does for
  three (l.118-121); the release defines two.
- The cosine logits are computed in float32 (under bf16 autocast too): normalising in bf16 would
  round the cosines to ~3 digits.

Each step reports `loss` (the CE the step minimised), `loss.<m>` (the CE of modality m's own
logits, the release's loss_a/loss_v, l.142-143), `logit_y.<m>` (the batch mean of the true class's
logit, the release's tensorboard data/logit_a and data/logit_v, l.129-135) and `cosine` (1 when the
cosine loss was on, else 0). Cost: joint training's (one forward, one backward).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import ConcatFusion, Fusion, SumFusion, build_fusion

FUSIONS = ("concat", "sum")


class MMCosineParams(Window):
    scaling: float = tunable(10.0, 1.0, 50.0, log=True, gt=0)  # release: 10 (argparse, README); BalanceBenchmark: 15
    cosine: bool = True  # the release's --mmcosine; off = joint training
    fused_eval: Literal["linear", "cosine"] = "linear"  # release / BalanceBenchmark

    @model_validator(mode="after")
    def _consistent(self) -> MMCosineParams:
        if not self.cosine and self.fused_eval == "cosine":
            raise ValueError("fused_eval='cosine' needs cosine=true (with the cosine loss off the "
                             "method is joint training); remove one of them")
        return self


# ------------------------------------------------------------------------------ pure functions


def modality_weights(fusion: Fusion, dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """W_m per modality: the columns of a concat head over f_m (in the dataset's order), or the
    weights of a sum head's own linear layer."""
    if isinstance(fusion, SumFusion):
        return {m: fusion.heads[m].weight for m in dims}
    assert isinstance(fusion, ConcatFusion)
    out, start = {}, 0
    for m, d in dims.items():
        out[m] = fusion.fc_out.weight[:, start:start + d]
        start += d
    return out


def cosine_logits(feats: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                  scaling: float) -> dict[str, torch.Tensor]:
    """z_m = s * cos(f_m, w_{m,c}) for every class c, in float32."""
    return {m: (F.normalize(feats[m].float(), dim=1) @ F.normalize(weights[m].float(), dim=1).t()) * scaling
            for m in feats}


def true_class_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch mean of the true class's logit (0-d)."""
    return logits.detach().float().gather(1, labels[:, None]).mean()


# ------------------------------------------------------------------------------------ the method


@METHODS.register("mmcosine")
class MMCosine(Method):
    family = "objective"  # BalanceBenchmark's taxonomy (spec/peers.md, section 1.6): it changes the loss
    Params = MMCosineParams

    def __init__(self, params: MMCosineParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if setup.fusion not in FUSIONS:
            raise ConfigError(f"method mmcosine splits the fusion head's weights by modality, which "
                              f"model.fusion={setup.fusion!r} has not; use one of {', '.join(FUSIONS)}")
        self.dims = setup.feature_dims()
        self.fusion = build_fusion(setup.fusion, self.dims, setup.num_classes, setup.conditioning)

    def cosine_on(self, epoch: int) -> bool:
        p = self.params
        return p.cosine and p.in_window(epoch)

    def cosine_view(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return cosine_logits(feats, modality_weights(self.fusion, self.dims), self.params.scaling)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        on = self.cosine_on(ctx.epoch)
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            if on:
                own = self.cosine_view(feats)
                fused = sum(own.values())
            else:
                fused, own = self.fusion(feats), self.fusion.per_modality(feats)
            loss = self.cross_entropy(fused, labels)
        ctx.backward(loss)
        ctx.step()
        out = {"loss": loss.detach(), "cosine": torch.tensor(float(on))}
        with torch.no_grad():
            for m in self.modality_names:
                out[f"loss.{m}"] = self.cross_entropy(own[m].detach(), labels)
                out[f"logit_y.{m}"] = true_class_mean(own[m], labels)
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        if not self.params.cosine:
            return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
        own = self.cosine_view(feats)
        fused = sum(own.values()) if self.params.fused_eval == "cosine" else self.fusion(feats)
        return Prediction(fused, own)
