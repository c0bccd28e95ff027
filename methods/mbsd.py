"""MBSD: self-distillation between modality branches, as BalanceBenchmark releases it.

BalanceBenchmark's method table (its objective family) names it MBSD and cites Liu et al. 2023; no
release of that paper could be found (searched by name and description) and its text could not be
read, so the method is BalanceBenchmark's (GeWu-Lab/BalanceBenchmark @ 4c1482f,
balancemm/trainer/MBSD_trainer.py, lines cited as T:<line>), and no paper-side variant is offered.

The model is the joint one (BaseClassifierModel, concat fusion): fused logits z = head(f_1..f_M) and
each modality's branch logits u_m, the head's split (its block of the weights plus the bias / M).
Per step, inside the window `modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based;
BalanceBenchmark's 0 and 80, configs/trainer_config.yaml L47-50):
1. p_m = softmax(u_m), q_m,i = p_m,i[y_i] (the true class's probability), and for every pair of
   branches (i, j), in the modalities' order (T:151-173 for two, T:175-232 for three):
   ps = max(q_i, q_j), pw = min(q_i, q_j) per sample (the stronger and the weaker branch), and the
   sample weight w = ps - pw where at least one of the two branches predicts the label
   (argmax = y), else 0 (T:166-169);
   RS = (1/C) sum_c (a_i,c - a_j,c)^2 per sample, with a = the logits u for two modalities (T:153)
   and the probabilities p for three (T:212-214), as the code has it;
   KL = F.kl_div(ps, pw, reduction="none") = pw (log pw - ps) per sample (T:171): torch's KL with
   ps taken as a log-probability although it is a probability, as the code has it.
   Pair terms: (w . RS) / B and (w . KL) / B (T:172-177).
2. L = CE(z, y) + sum_m CE(u_m, y) + mean over pairs of the RS terms + mean over pairs of the KL
   terms (T:178; T:227-234 average the three pairs). Nothing is detached: w, ps and pw keep their
   graphs (the code writes them into fresh tensors item by item, which autograd follows), so the
   gradient runs through the weights and through both sides of the KL.
Outside the window L = CE(z, y), exactly joint training (T:236-238).

Departures from the release:
- T:131 calls `model.Unimodality_Calculate()`, renamed `unimodality_calculate` in the release
  commit (an AttributeError at HEAD); the forward pass has already computed the branch logits
  (avclassify_model.py L271), so the line is left out.
- M >= 4: the code's three-modality branch reads only the first three modalities; here every pair
  of the M branches enters the means (for M = 2 and 3 the code's terms exactly).
- The per-sample Python loop (T:161-170) is vectorised (torch.maximum/minimum/where); at an exact
  tie q_i = q_j the weight is 0 either way.
Fusion: concat (the release's), sum and late, whose heads split by modality; FiLM and gated
fusion are refused.

Each step reports `loss` (the total optimised), `loss_fused`, `loss_rs` and `loss_kl` (the pair
means, 0 outside the window), `weight` (the mean sample weight w over pairs and batch),
`conf.<m>` (the mean true-class probability of branch m, the quantity the weights compare) and
`modulated`. Cost: one forward and one backward pass per step, as joint training.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion


class MBSDParams(Window):
    # BalanceBenchmark's configs/trainer_config.yaml L47-50
    modulation_ends: int | None = Field(80, ge=0)  # None: no end


# ------------------------------------------------------------ the distillation (pure functions)


def pair_weights(probs_i: torch.Tensor, probs_j: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, ps, pw) per sample: the stronger and weaker branch's true-class probability, and their
    gap where either branch predicts the label (else 0). All keep their graphs."""
    q_i = probs_i.gather(1, labels[:, None])[:, 0]
    q_j = probs_j.gather(1, labels[:, None])[:, 0]
    ps, pw = torch.maximum(q_i, q_j), torch.minimum(q_i, q_j)
    correct = (probs_i.argmax(dim=1) == labels) | (probs_j.argmax(dim=1) == labels)
    return torch.where(correct, ps - pw, torch.zeros_like(ps)), ps, pw


def pair_terms(a_i: torch.Tensor, a_j: torch.Tensor, w: torch.Tensor, ps: torch.Tensor,
               pw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RS, KL) of a pair: (w . mean_c (a_i - a_j)^2) / B and (w . kl_div(ps, pw)) / B."""
    rs = ((a_i - a_j) ** 2).sum(dim=1) / a_i.shape[1]
    kl = F.kl_div(ps, pw, reduction="none")
    return (w * rs).sum() / len(w), (w * kl).sum() / len(w)


def distillation(logits: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RS, KL, mean weight), each averaged over every pair of branches; RS compares logits for two
    branches and probabilities for more, as the release does."""
    probs = {m: F.softmax(z.float(), dim=1) for m, z in logits.items()}
    compared = {m: z.float() for m, z in logits.items()} if len(logits) == 2 else probs
    rs, kl, weights = [], [], []
    for i, j in combinations(logits, 2):
        w, ps, pw = pair_weights(probs[i], probs[j], labels)
        pair_rs, pair_kl = pair_terms(compared[i], compared[j], w, ps, pw)
        rs.append(pair_rs)
        kl.append(pair_kl)
        weights.append(w.detach().mean())
    return torch.stack(rs).mean(), torch.stack(kl).mean(), torch.stack(weights).mean()


# ------------------------------------------------------------------------------------ the method


@METHODS.register("mbsd")
class MBSD(Method):
    family = "objective"  # BalanceBenchmark's taxonomy (its method table): a loss between branches
    Params = MBSDParams

    def __init__(self, params: MBSDParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if setup.fusion not in ("concat", "sum", "late"):
            raise ConfigError(
                f"method mbsd distils between each modality's branch logits, which model.fusion="
                f"{setup.fusion!r} does not have; set model.fusion to concat (the release's), sum or late")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes)

    def in_window(self, epoch: int) -> bool:
        return self.params.in_window(epoch)

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        active = self.in_window(ctx.epoch)
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            loss_fused = self.cross_entropy(self.fusion(feats), labels)
            with torch.set_grad_enabled(active):
                logits = self.fusion.per_modality(feats)
            if active:
                rs, kl, weight = distillation(logits, labels)
                total = loss_fused + sum(self.cross_entropy(u, labels) for u in logits.values()) + rs + kl
            else:
                total = loss_fused
        ctx.backward(total)
        ctx.step()
        return self.report(total, loss_fused, logits, labels, (rs, kl, weight) if active else None)

    @staticmethod
    def report(total: torch.Tensor, loss_fused: torch.Tensor, logits: dict[str, torch.Tensor],
               labels: torch.Tensor, terms: tuple[torch.Tensor, ...] | None) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=labels.device)
        rs, kl, weight = terms if terms is not None else (zero, zero, zero)
        out = {"loss": total.detach(), "loss_fused": loss_fused.detach(), "loss_rs": rs.detach(),
               "loss_kl": kl.detach(), "weight": weight, "modulated": torch.tensor(float(terms is not None))}
        for m, z in logits.items():
            out[f"conf.{m}"] = F.softmax(z.detach().float(), dim=1).gather(1, labels[:, None]).mean()
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
