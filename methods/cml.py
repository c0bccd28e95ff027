"""CML: calibrating multimodal learning (Ma, Zhang, Zhang, Wu, Fu, Zhou & Hu, ICML 2023, arXiv 2306.01265).

The paper's principle: the confidence of a prediction must not increase when a modality is removed.
Its regulariser penalises every sample whose confidence (the largest softmax probability) with fewer
modalities exceeds the confidence with more, and the model is also trained to classify from each of
these modality subsets.

Released code: QingyangZhang/CML @ 9d2496e6f37a (the paper's release, for CPM-Nets and MIWAE on
multi-view data): cpm/CPM_Nets.py `rank_loss` l.98-124, used in `train` l.159-174 as
cls + beta * rank, with cls the mean over the modality subsets of their classification losses.
Second reference: BalanceBenchmark (GeWu-Lab/BalanceBenchmark @ 4c1482fca5aa),
balancemm/trainer/CML_trainer.py (`conf_loss` l.19-22, the removal order l.62-67 and `training_step`
l.107-216), which brings CML to the audio-visual classifiers this suite has.

The model is joint training's: one encoder per modality and a fusion head (concat or sum). Per step,
inside the window `modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based epochs):

1. A chain of modality subsets (`subset_chain`): z_0 = the fused logits with every modality; z_{k+1}
   = z_k minus the contribution of the next modality in the removal order, down to one modality
   (M logits for M modalities). A modality's contribution is its block of the fusion head's weights
   times its feature (concat: the bias stays, as BalanceBenchmark's out_s - out_removed + bias/M,
   l.139 and l.185) or its own head's output with that head's bias (sum fusion).
   The removal order is a permutation of the modalities drawn at the start of each epoch with
   Python's `random.shuffle` (the harness checkpoints its state, so resume is exact) and consumed
   from its end, as BalanceBenchmark's `random_dict.pop()`.
2. Confidences c_k = max softmax(z_k) and predictions p_k = argmax z_k, per sample, not detached.
3. Loss = (1/M) sum_k CE(z_k, y) + lam * R, with the regulariser R by `variant`:
   - `release` (default, CPM_Nets.py l.121-123): R = sum_k sum_i ReLU((c_{k+1,i} - c_{k,i}) s_{k,i}),
     s_{k,i} = 0 when the subset with fewer modalities predicts sample i correctly and the one
     with more does not (the code's "trick 1"), else 1: a per-sample hinge.
   - `balancebenchmark` (conf_loss l.19-22): R = sum_k max(0, sum_i (c_{k+1,i} - c_{k,i})): the hinge
     of the batch sum, without the mask (conf_loss computes its own sign, with the roles of the two
     subsets swapped, and only returns its count, which the trainer discards).
   Both sum over the samples of the batch (not a mean), as the two codes do.
Outside the window the loss is the plain cross-entropy of z_0: joint training.

Paper vs code, and departures:
- The release trains CPM-Nets/MIWAE, whose "subsets" are inputs with views removed in an order drawn
  once per sample for the whole training (cpm/util/get_sn.py `get_sn_for_multi_input`); its model
  family is not in the suite. Here the order is BalanceBenchmark's, one per epoch for all samples;
  the release's per-sample regulariser is the `release` variant.
- lam: BalanceBenchmark's config 0.1; the release's beta (CPM's --beta) has no single value
  (its README runs 10 for MIWAE).
- BalanceBenchmark draws the order at every epoch; here only at epochs inside the window, so that
  a closed window leaves joint training's random streams untouched (the same orders when the
  window opens at epoch 0, its config).
- Prediction is joint training's (the fused logits; per modality, the head's split): CML changes
  only the training loss.

Each step reports `loss` (the minimised loss), `loss.ce` (the mean CE over the chain), `loss.cml`
(R), `conf.drop<k>` (the batch mean of c_k, k modalities removed; `conf.drop0` the full model),
`violation` (the share of sample-links with c_{k+1} > c_k) and `cml` (1 inside the window). Cost:
joint training's (one forward, one backward; the chain reuses the features).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import ConcatFusion, Fusion, SumFusion, build_fusion

FUSIONS = ("concat", "sum")


class CMLParams(Window):
    lam: float = tunable(0.1, 0.01, 1.0, log=True, ge=0)  # BalanceBenchmark's config
    variant: Literal["release", "balancebenchmark"] = "release"


# ------------------------------------------------------------------------------ pure functions


def contributions(fusion: Fusion, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each modality adds to the fused logits: W_m f_m (concat, the bias not included), or its
    own head's output (sum fusion)."""
    if isinstance(fusion, SumFusion):
        return {m: fusion.heads[m](feats[m]) for m in feats}
    assert isinstance(fusion, ConcatFusion)
    out, start = {}, 0
    for m in fusion.modalities:
        d = fusion.dims[m]
        out[m] = feats[m] @ fusion.fc_out.weight[:, start:start + d].t()
        start += d
    return out


def subset_chain(full: torch.Tensor, contrib: dict[str, torch.Tensor], removal: Sequence[str]) -> list[torch.Tensor]:
    """[z_0 = full, z_1 = z_0 - contrib[removal[0]], ...]: one logits tensor per subset."""
    chain = [full]
    for m in removal:
        chain.append(chain[-1] - contrib[m])
    return chain


def confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability, its class) per sample."""
    return torch.max(F.softmax(logits.float(), dim=1), dim=1)


def calibration_penalty(chain: Sequence[torch.Tensor], labels: torch.Tensor,
                        variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """R over consecutive subsets (see the module docstring), and the share of sample-links whose
    confidence rose when a modality was removed."""
    conf = [confidences(z) for z in chain]
    total, rises = chain[0].new_zeros((), dtype=torch.float32), []
    for (c_more, p_more), (c_fewer, p_fewer) in zip(conf, conf[1:]):
        rise = c_fewer - c_more
        rises.append(rise.detach() > 0)
        if variant == "release":
            keep = ~((p_fewer == labels) & (p_more != labels))  # the release's "trick 1"
            total = total + F.relu(rise * keep.long()).sum()
        else:
            total = total + F.relu(rise.sum())
    return total, torch.cat(rises).float().mean()


# ------------------------------------------------------------------------------------ the method


@METHODS.register("cml")
class CML(Method):
    family = "objective"  # BalanceBenchmark's taxonomy (spec/peers.md, section 1.6): it adds a loss
    Params = CMLParams

    def __init__(self, params: CMLParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if setup.fusion not in FUSIONS:
            raise ConfigError(f"method cml removes modalities from the fused logits by the fusion head's "
                              f"per-modality terms, which model.fusion={setup.fusion!r} has not; use one of "
                              f"{', '.join(FUSIONS)}")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        # popped from the end, as BalanceBenchmark's random_dict; redrawn at each epoch in the window
        self.order = list(self.modality_names)

    def in_window(self, epoch: int) -> bool:
        p = self.params
        return p.in_window(epoch)

    def on_epoch_start(self, epoch: int) -> None:
        if self.in_window(epoch):
            self.order = list(self.modality_names)
            random.shuffle(self.order)

    def removal(self) -> list[str]:
        """The modalities in the order they leave the chain (M - 1 of them)."""
        return self.order[::-1][:-1]

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        on = self.in_window(ctx.epoch)
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            full = self.fusion(feats)
            if on:
                chain = subset_chain(full, contributions(self.fusion, feats), self.removal())
                ce = sum(self.cross_entropy(z, labels) for z in chain) / len(chain)
                penalty, violation = calibration_penalty(chain, labels, self.params.variant)
                loss = ce + self.params.lam * penalty
            else:
                chain = [full]
                loss = self.cross_entropy(full, labels)
        ctx.backward(loss)
        ctx.step()
        out = {"loss": loss.detach(), "cml": torch.tensor(float(on))}
        if on:
            out |= {"loss.ce": ce.detach(), "loss.cml": penalty.detach(), "violation": violation}
            with torch.no_grad():
                out |= {f"conf.drop{k}": confidences(z)[0].mean() for k, z in enumerate(chain)}
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
