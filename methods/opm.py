"""OPM: on-the-fly prediction modulation (Wei, Hu, Du & Wen, TPAMI 2024; the BML release).

The paper: "On-the-fly Modulation for Balanced Multimodal Learning" (BML).

Joint training (one fused cross-entropy, one backward, one step), except that in the forward pass
the features of the modality that leads are dropped, sample by sample, with a probability that
grows with its lead. Per step, as the released code does it (GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f,
code/models/Classifier.py and code/main.py; line numbers below are of those files):

1. Each modality's logits are estimated from the fusion head on the un-dropped features, without
   gradient: concat: that modality's block of the weights times its feature plus bias/M
   (Classifier.py L112-140, `t1 = out_1 w[:, :512]^T + b/2`); sum: its own head plus its bias/M;
   late: its private head (the release has concat only; sum and late use the head's own split,
   `fusion.per_modality`). FiLM and gated fusion have no split and are refused.
2. Scores are batch SUMS of the ground-truth-class softmax, s_m = sum_i softmax(o_m,i)[y_i]
   (L142-143), and the ratio is rho_m = s_m / s_other (calcu_q, L61-62). The release defines two
   modalities; for M >= 3 the ratio is BalanceBenchmark's, s_m / (sum of the others' s)
   (OPM_trainer.py L174-181, written there for M = 3 only; its M >= 4 branch divides by nothing).
   So with three modalities only one that holds more than half of the total score is dropped (on
   the gaussian3 data none does: OPM then trains as joint).
3. The drop probability is q_m = clip(q_base (1 + lam tanh(rho_m - 1)), 0, 1) if rho_m > 1, else 0
   (calcu_q, L58-72). With these ratios at most one modality has rho > 1 (s_m > the sum of the
   others excludes any other), so only the leading modality is ever dropped (not so in the
   `balancebenchmark` variant below).
4. With probability p_exe the drop is executed this step: a uniform draw u from numpy's global
   RNG, executed when u >= 1 - p_exe (Modality_drop.execute_drop, L34; the harness checkpoints
   numpy's RNG, so resume is exact). Then keep-masks k_m,i ~ Bernoulli(1 - q_m) are drawn from
   torch's RNG in the release's order (L45: Bernoulli(1 - q).sample([B, 1]), B x 1 x M), and EVERY
   modality's features (not only the dropped one's) become f_m,i k_m,i / (1 - theta), with
   theta = sum_m d_m q_m / sum_m d_m the expected fraction of dropped feature entries (d_m the
   feature sizes; L39-49, and custom_autograd L9-21, which scales forward and backward alike).
   Samples whose every modality is dropped leave the batch (L50-54, main.py L95-101); here they
   get weight 0 in the mean cross-entropy instead, the same loss and gradients without a
   data-dependent shape (no host synchronisation). In the release that never happens (step 3: a
   modality that does not lead is never dropped); in the `balancebenchmark` variant it does. Were
   a whole batch to go (probability about (q_a q_v)^B), the release would skip the step (main.py
   L96-97) and BalanceBenchmark would take the mean of nothing (NaN); here the loss is 0 and the
   optimizer still steps (momentum, weight decay).
5. The fused logits of the (dropped, rescaled) features, their cross-entropy, backward, step.
   Evaluation never drops (main.py's val() calls the model with warm_up=1).

Window: the release hard-codes a warm-up, no drop in epochs 0-5 (main.py L91,
`warm_up = 1 if epoch <= 5`), and has no end; here the drop runs in epochs
`modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based; default 6 and no end, the
release's). Outside the window a step is exactly a joint-training step.

Variants (`variant`), each transcribed beside this method in tests/test_opm.py:
- `bml` (default): the paper's release, as above.
- `balancebenchmark`: BalanceBenchmark's `OPMTrainer` (GeWu-Lab/BalanceBenchmark @ 4c1482f,
  balancemm/trainer/OPM_trainer.py): 1e-5 is added to the ratio's denominator (L172, L180) and to
  the rescaling, 1 / (1 - theta + 1e-5) (L41); and the ratios are computed in place: L166
  `ratios[modality] = scores[modality]` aliases the score tensor and L172/L180 divide it with
  `/=`, so each modality's score is replaced by its ratio before the next modality divides by
  it. For (audio, visual): rho_a = s_a / (s_v + 1e-5) as meant, but rho_v = s_v / (rho_a + 1e-5),
  about s_v^2 / s_a, which exceeds 1 whenever s_v^2 > s_a -- for batch sums (s up to the batch
  size) nearly always. So this variant drops the second modality in almost every executed step,
  and both when the first leads (then samples that lose both leave the batch, step 4); with three
  modalities the third divides by two ratios and is dropped likewise (`score_ratios`,
  sequential=True). Its trainer defines M = 3 as the sum of the others; here any M >= 3. Its
  settings are method settings here, for its recipe: q_base 0.4, lam 0.5 (called alpha there),
  p_exe 0.7, window 0-80 (configs/trainer_config.yaml).
  Two of its lines do not run as written and are not reproduced: L148 calls
  `model.Unimodality_Calculate()`, renamed `unimodality_calculate` in its release commit (an
  AttributeError; the forward pass has already computed those logits), and outside its window the
  step returns `loss['output']` of an empty dict (a KeyError).

Gradient through the drop probability (`q_grad`). In both reference codes q keeps the autograd
graph of the scores it comes from (the scores are computed from the encoders' features, not
detached), and the rescaling passes a gradient into it:
- `bml`: custom_autograd.backward (Classifier.py L17-21) returns theta ITSELF as theta's gradient
  (`return input_grad, theta`), whatever the loss; it flows through theta, q, rho and the scores
  into both encoders' features (the head's weights are detached in the score path, L112-113), as
  if theta_bar * theta (theta_bar held constant) were added to the loss: a push towards a smaller
  drop probability, i.e. towards lowering the leading modality's score and raising the other's.
- `balancebenchmark`: the features are divided by 1 - theta + 1e-5 with theta's graph, so autograd
  differentiates the rescaling through q and the scores into the features AND the head's weights
  (its unimodal logits do not detach them).
`code` (default) reproduces these; `none` makes q a constant of the step, the drop as the paper's
pipeline figure draws it (a probability read off the monitored discrepancy). Only executed drops
are affected: a step without a drop has no theta.

Paper vs code. The paper's text could not be read for this implementation (only its abstract and
the release's OPM.jpg pipeline figure: each modality's features dropped in the batch with
probability q_t^u, updated from the discrepancy ratio rho_t^u of the softmaxed logits-a/logits-v),
so every rule above is the release's, and `q_grad=none` is the one paper-side reading offered;
should the paper's equations differ elsewhere (the rescaling, the M >= 3 ratio), that form is not
yet a variant. Defaults: q_base 0.5, lam 0.5, p_exe 0.7 -- the release's argparse defaults
(main.py L42-44) and scripts/train_opm.sh; its config.py says q_base 0.4, but
`cfg.parse(vars(args))` overwrites it with the argparse default. The release file Classifier.py
does not even parse at HEAD (a stray `]` at L53), so "the release" means it with that character
removed.

Each step reports `loss` (the fused cross-entropy that was optimised), `ratio.<m>` (rho_m),
`drop_prob.<m>` (q_m), `dropped.<m>` (the fraction of the batch whose m features were zeroed; 0
when the drop did not run), `executed` (1 when the drop ran this step) and `modulated` (1 inside
the window); the harness averages them over the epoch. Cost: one forward and one backward pass per
step, as joint training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.methods.ogm_ge import ground_truth_scores
from mmbalance.models.fusion import ConcatFusion, Fusion, LateFusion, SumFusion, build_fusion

# the variants' guards: added to the ratio's denominator and to 1 - theta
EPS = {"bml": 0.0, "balancebenchmark": 1e-5}


class OPMParams(Window):
    # the release's argparse defaults (main.py L42-44), as scripts/train_opm.sh runs them
    q_base: float = tunable(0.5, 0.1, 0.9, ge=0, le=1)
    lam: float = tunable(0.5, 0.05, 2.0, log=True, ge=0)  # lambda; BalanceBenchmark calls it alpha
    p_exe: float = Field(0.7, ge=0, le=1)
    # the release's hard-coded warm-up: no drop in epochs 0-5, no end
    modulation_starts: int = Field(6, ge=0)
    variant: Literal["bml", "balancebenchmark"] = "bml"
    # code: the gradient the reference code sends through the drop probability (see the docstring)
    q_grad: Literal["code", "none"] = "code"


# ---------------------------------------------------------------- the drop (pure functions)


class SplitView(nn.Module):
    """Calls a fusion head's `per_modality` as its forward, so that torch.func.functional_call can
    evaluate it with substituted (detached) parameters."""

    def __init__(self, fusion: Fusion) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.fusion.per_modality(feats)


def split_logits(fusion: Fusion, feats: dict[str, torch.Tensor], head_grad: bool) -> dict[str, torch.Tensor]:
    """Each modality's logits from the head's split; with head_grad=False the head's parameters
    are detached (BML clones and detaches them, Classifier.py L112-113) while the features keep
    their graph."""
    if head_grad:
        return fusion.per_modality(feats)
    view = SplitView(fusion)
    return functional_call(view, {n: p.detach() for n, p in view.named_parameters()}, (feats,))


def score_ratios(scores: dict[str, torch.Tensor], eps: float = 0.0,
                 sequential: bool = False) -> dict[str, torch.Tensor]:
    """rho_m = s_m / (sum of the other modalities' scores + eps), in the order of `scores`; for two
    modalities s_a / s_v and s_v / s_a, each computed directly, as calcu_q does.

    sequential: BalanceBenchmark's in-place quirk -- once a modality's ratio is computed it takes
    the place of its score, so later modalities divide by the earlier ones' RATIOS.
    """
    current, ratios = dict(scores), {}
    for m in scores:
        ratios[m] = scores[m] / (sum(current[o] for o in scores if o != m) + eps)
        if sequential:
            current[m] = ratios[m]
    return ratios


def drop_probabilities(ratios: dict[str, torch.Tensor], q_base: float, lam: float) -> dict[str, torch.Tensor]:
    """q_m = clip(q_base (1 + lam tanh(rho_m - 1)), 0, 1) where rho_m > 1, else 0 (as tensors, so
    that the step never waits for the GPU)."""
    out = {}
    for m, rho in ratios.items():
        lead = torch.tanh(torch.relu(rho - 1))
        out[m] = torch.where(lead > 0, q_base * (1 + lam * lead), torch.zeros_like(lead)).clamp(0.0, 1.0)
    return out


def keep_masks(q: torch.Tensor, batch: int) -> torch.Tensor:
    """(M, B) keep-masks, k[m, i] ~ Bernoulli(1 - q_m), drawn in the release's order: a B x 1 x M
    sample (Bernoulli(1 - q).sample([B, 1])), then modality-major."""
    return torch.bernoulli((1 - q).expand(batch, 1, len(q))).permute(2, 1, 0).reshape(len(q), batch)


def dropped_fraction(q: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """theta = sum_m d_m q_m / sum_m d_m: the expected fraction of feature entries dropped."""
    return sum(d * q[k] for k, d in enumerate(dims)) / sum(dims)


def drop_features(feats: dict[str, torch.Tensor], masks: torch.Tensor, theta: torch.Tensor,
                  eps: float = 0.0) -> dict[str, torch.Tensor]:
    """f_m k_m / (1 - theta + eps) for every modality; the masks follow the order of `feats`."""
    scale = 1 - theta + eps
    return {m: f * masks[k][:, None].to(f.dtype) / scale.to(f.dtype) for k, (m, f) in enumerate(feats.items())}


def kept_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples with `kept` = 1 (0 if there are none)."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_sample * kept).sum() / kept.sum().clamp(min=1)


# ------------------------------------------------------------------------------------ the method


@METHODS.register("opm")
class OPM(Method):
    family = "feed-forward"
    Params = OPMParams

    def __init__(self, params: OPMParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if setup.fusion not in ("concat", "sum", "late"):
            raise ConfigError(
                f"method opm estimates each modality's logits from the fusion head's split, which "
                f"model.fusion={setup.fusion!r} does not have; set model.fusion to concat (the release's), sum or late"
            )
        if params.modulation_starts >= setup.epochs:
            raise ConfigError(
                f"method.modulation_starts={params.modulation_starts} is not below train.epochs={setup.epochs}: "
                "OPM would never drop and train as joint; lower it (the release starts at epoch 6) "
                "or train longer"
            )
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        assert isinstance(self.fusion, (ConcatFusion, SumFusion, LateFusion))
        self.dims = setup.feature_dims()
        self.eps = EPS[params.variant]

    def in_window(self, epoch: int) -> bool:
        return self.params.in_window(epoch)

    def discrepancy(self, feats: dict[str, torch.Tensor],
                    labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(rho_m, q_m) from the un-dropped features; they keep a graph where grad is enabled."""
        bb = self.params.variant == "balancebenchmark"
        estimates = split_logits(self.fusion, {m: f.float() for m, f in feats.items()}, head_grad=bb)
        scores = {m: ground_truth_scores(estimates[m], labels) for m in self.modality_names}
        ratios = score_ratios(scores, self.eps, sequential=bb)
        return ratios, drop_probabilities(ratios, self.params.q_base, self.params.lam)

    def dropped_loss(self, feats: dict[str, torch.Tensor], labels: torch.Tensor,
                     q: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the cross-entropy of the dropped features, what to back-propagate, the keep-masks)."""
        q_all = torch.stack([q[m] for m in self.modality_names])
        masks = keep_masks(q_all.detach(), len(labels))
        theta = dropped_fraction(q_all, [self.dims[m] for m in self.modality_names])
        bml = self.params.variant == "bml"
        dropped = drop_features(feats, masks, theta.detach() if bml else theta, self.eps)
        loss = kept_cross_entropy(self.fusion(dropped), labels, masks.amax(dim=0))
        if bml and self.params.q_grad == "code":
            # custom_autograd.backward returns theta itself as theta's gradient: the gradient of
            # theta_bar * theta, theta_bar held constant
            return loss, loss + theta.detach() * theta, masks
        return loss, loss, masks

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        ctx.zero_grad()
        active = self.in_window(ctx.epoch)
        # the release's draw, on the host from numpy's RNG, only inside the window
        executed = active and np.random.rand(1).item() >= 1 - self.params.p_exe
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            with torch.set_grad_enabled(executed and self.params.q_grad == "code"):
                ratios, q = self.discrepancy(feats, labels)
            if executed:
                loss, objective, masks = self.dropped_loss(feats, labels, q)
            else:
                loss = objective = self.cross_entropy(self.fusion(feats), labels)
        ctx.backward(objective)
        ctx.step()

        out = {"loss": loss.detach()}
        for k, m in enumerate(self.modality_names):
            out[f"ratio.{m}"] = ratios[m].detach()
            out[f"drop_prob.{m}"] = q[m].detach()
            out[f"dropped.{m}"] = 1 - masks[k].mean() if executed else torch.zeros((), device=labels.device)
        out["executed"] = torch.tensor(float(executed))
        out["modulated"] = torch.tensor(float(active))
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
