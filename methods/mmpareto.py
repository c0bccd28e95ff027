"""MMPareto: Pareto integration of the multimodal and unimodal gradients (Wei & Hu, ICML 2024).

Paper: Yake Wei, Di Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024, arXiv 2405.17730. Reference: the authors' release GeWu-Lab/MMPareto_ICML2024
@ a339db3, code/MMPareto.py `train_epoch` (l.57-213) and code/min_norm_solvers.py; second reference:
BalanceBenchmark's `MMParetoTrainer` (GeWu-Lab/BalanceBenchmark @ 4c1482f,
balancemm/trainer/MMPareto_trainer.py l.242-406).

The model is the multitask-like one: encoders, a fusion head trained by the multimodal
cross-entropy L_mm, and per modality m a unimodal cross-entropy L_m on that modality's own
logits (the release: a private linear head per modality, `head_audio`/`head_video` of
models/models.py AVClassifier). Per step (l.88-209):

1. One forward; L_mm = CE(fusion(f), y), L_m = CE(head_m(f_m), y).
2. For every encoder m, the gradient of L_mm and of L_m with respect to that encoder's parameters
   (all its tensors as ONE flat vector): g_mm and g_u.
3. Pareto weights per encoder (l.149-174): if cos(g_mm, g_u) > 0, w = 1/2 for both; otherwise w
   minimises ||w g_mm + (1 - w) g_u|| (MinNormSolver._min_norm_element_from2 for two vectors:
   w = <g_u, g_u - g_mm> / ||g_mm - g_u||^2, or 0.999 when <g_mm, g_u> >= ||g_mm||^2, 0.001 when
   >= ||g_u||^2; `min_norm_weight`). `w_mm` below is the multimodal gradient's weight, audio_k[0].
4. Per parameter TENSOR p of encoder m (l.184-207): h = 2 w g_mm,p + 2 (1 - w) g_u,p; if the
   plain sum g_mm,p + g_u,p is longer than h, h is scaled up to its norm; the gradient stepped is
   gamma h (gamma = 1.5, hard-coded in l.178). `combine` does this. The weights are one pair per
   encoder, the rescaling is per tensor.
5. Every other parameter (the fusion head, the unimodal heads) gets the plain gradient of
   L_mm + sum_m L_m (l.180-181), without gamma. One optimizer step.

`loss` reported is L_mm + sum_m L_m, as the code accumulates it; also `loss.mm`, `loss.<m>`, and
per encoder `cos.<m>` (the cosine of step 3), `conflict.<m>` (1 when cos <= 0: the Pareto weights
were solved), `w_mm.<m>` and `boost.<m>` = ||final encoder gradient|| / ||g_mm + g_u|| (the
magnitude enhancement over the uniform sum, gamma included). It works for any number of
modalities: each encoder has its own two objectives (L_mm and its own L_m).

How it is computed here, equal to the release (tested to 1e-5 over several steps):
- Two backward passes (autograd.grad of L_mm, then of sum_m L_m) instead of the code's four (one
  per loss with retain_graph, then L_mm + L_a + L_v again): each L_m reaches only encoder m and
  its own head, so the second pass gives every encoder its g_u, and the heads' gradient is the sum
  of the two passes.
- Encoder membership is by module (`encoders[m].parameters()`), not by the code's name tests
  (`'head' in name`, `'audio' in re.split('[_.]', name)`), which select the same tensors there.
- Each encoder's two gradients are concatenated into flat vectors once (the code's "concat"),
  and the cosine, the Gram products and every per-tensor norm are taken on them. The code hands
  the solver each tensor AND their concatenation (`list(grads[t].values())` includes "concat"),
  which doubles every product: the weight is scale-invariant, so nothing changes.
- Where the code would divide by a zero ||h|| (h = 0 while the plain sum is not: its NaN
  gradient), h is kept (zero) instead. 0/0 keeps h in the code too.
- No host synchronisation: the branches are torch.where on tensors.
- Note for recipes: the release builds StepLR(30, 0.1) but never steps it: its learning rate is
  constant.

Variants (defaults: the release):
- `unimodal_heads`: `private` (release) = a linear head per modality; `fusion_split`
  (BalanceBenchmark, `unimodality_calculate`) = the fusion head's own per-modality logits: for
  concat, that modality's block of the weights plus bias / M, so L_m also trains the fusion head.
  Needs a fusion that splits by modality (concat, sum, late). Sharing the head's weights, L_m's
  gradient on encoder m then nearly equals L_mm's (cos ~ 1 in the tests): conflicts are rare.
- `grads`: `separate` (release: zero_grad between the backward passes, so g_mm and g_u are the
  two objectives' own gradients); `accumulated` (BalanceBenchmark): its loop calls backward on
  every loss WITHOUT zeroing in between and only then reads the gradients, so both "objectives"
  read the same accumulated g_mm + g_u. The cosine is then 1, the Pareto weights are never
  solved, h = 2 (g_mm + g_u) is never scaled up, and every encoder gradient becomes
  2 gamma (g_mm + g_u) (3x the plain sum at gamma = 1.5), while the heads get the plain sum.
  (Its solver branch, never reached, also assigns the solution to the loop variable `modality`
  instead of the weights; and the HEAD commit calls `model.Unimodality_Calculate`, renamed
  `unimodality_calculate` in the model, so that trainer stops with an AttributeError on its first
  step; this is the computation of the pre-release commit 0d206ba, where the name still matched.)
  BalanceBenchmark also gates the step by `modulation_starts <= epoch <= modulation_ends` (0-80 in
  its config), and outside it takes no backward at all and fails on an unbound `total_loss`: not
  reproduced (there is no working "off" branch to reproduce).
- `pareto: false` keeps w = 1/2 always: the direction of the paper's uniform baseline
  (code/uniform_baseline.py: L_mm + L_a + L_v); with `gamma: 1` it IS that baseline, the base
  MMPareto reduces to with its mechanism off (tested).
The paper's own statement of the update (its algorithm box) was not available where this file was
written (only the abstract and introduction of arXiv 2405.17730 could be read), so no separate
paper variant is written: the default is the release's, the code the paper points to.

Cost per step: one forward per encoder, two backward passes (the code: four), and about fifteen
passes over a flat copy of each encoder's gradients (2.9-3.2x joint's CPU time per step with the
quickstart's small MLPs, whose parameters cost as much as their forward; the second backward
pass dominates with convolutional encoders).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from pydantic import PositiveFloat

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import ConcatFusion, LateFusion, SumFusion, build_fusion, linear

# MinNormSolver._min_norm_element_from2's weight of the first vector at the ends of the segment
AT_FIRST, AT_SECOND = 0.999, 0.001
COS_EPS = 1e-8  # F.cosine_similarity's default eps, which the code's cosine uses


class MMParetoParams(Strict):
    # the release's hard-coded gamma (MMPareto.py l.178); BalanceBenchmark's alpha (1.5 too). Searched from 1 (no
    # enhancement: the uniform baseline's magnitude) to twice the release's
    gamma: PositiveFloat = tunable(1.5, 1.0, 3.0)
    pareto: bool = True
    unimodal_heads: Literal["private", "fusion_split"] = "private"
    grads: Literal["separate", "accumulated"] = "separate"


# ------------------------------------------------------------------------ the update (pure)


def gram(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<a, a>, <a, b>, <b, b> of two flat vectors."""
    # mul-sum, as the code's solver: a BLAS dot (torch.dot) with several threads can spin for
    # milliseconds per call on a busy CPU
    return (a * a).sum(), (a * b).sum(), (b * b).sum()


def min_norm_weight(mm: torch.Tensor, mu: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:
    """The w in [0.001, 0.999] minimising ||w a + (1 - w) b|| from <a,a>, <a,b>, <b,b>, as
    MinNormSolver._min_norm_element_from2 (its ends are 0.999 and 0.001, not 1 and 0)."""
    inner = (uu - mu) / (mm + uu - 2 * mu)
    return torch.where(mu >= mm, AT_FIRST, torch.where(mu >= uu, AT_SECOND, inner))


def cosine(mm: torch.Tensor, mu: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:
    """cos(a, b) from the Gram products, each norm clamped at 1e-8 as F.cosine_similarity."""
    return mu / (mm.sqrt().clamp_min(COS_EPS) * uu.sqrt().clamp_min(COS_EPS))


def multimodal_weight(mm: torch.Tensor, mu: torch.Tensor, uu: torch.Tensor, pareto: bool) -> torch.Tensor:
    """The weight of the multimodal gradient: 1/2 where the two agree (cos > 0) or `pareto` is
    off, else the min-norm weight (the conflicting case)."""
    half = torch.full_like(mu, 0.5)
    if not pareto:
        return half
    return torch.where(cosine(mm, mu, uu) > 0, half, min_norm_weight(mm, mu, uu))


def segment_norms(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The norm of each consecutive segment of flat `x`, `sizes` elements each (one per tensor)."""
    return torch.stack([torch.linalg.vector_norm(s) for s in x.split(list(sizes))])


def combine(g_mm: torch.Tensor, g_u: torch.Tensor, w_mm: torch.Tensor, gamma: float,
            sizes: Sequence[int]) -> torch.Tensor:
    """An encoder's final gradient, its tensors flat one after another (`sizes` elements each): per
    tensor gamma h, h = 2 w g_mm + 2 (1 - w) g_u scaled up to the norm of that tensor's g_mm + g_u
    where it is shorter (MMPareto.py l.190-197)."""
    h = 2 * w_mm * g_mm + 2 * (1 - w_mm) * g_u
    plain, new = segment_norms(g_mm + g_u, sizes), segment_norms(h, sizes)
    # the code divides unguarded: x/0 would give a NaN gradient; h (= 0) is kept instead
    scale = torch.where((new > 0) & (plain > new), plain / new, torch.ones_like(new))
    return h * torch.cat([k.expand(n) for k, n in zip(scale, sizes)]) * gamma


# ------------------------------------------------------------------------------------ the method


@METHODS.register("mmpareto")
class MMPareto(Method):
    family = "objective"
    Params = MMParetoParams

    def __init__(self, params: MMParetoParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        # built after the fusion, so that encoders and fusion start as joint's
        self.heads: nn.ModuleDict | None = None
        if params.unimodal_heads == "private":
            self.heads = nn.ModuleDict({m: linear(d, setup.num_classes) for m, d in setup.feature_dims().items()})
        elif not isinstance(self.fusion, (ConcatFusion, SumFusion, LateFusion)):
            raise ConfigError(f"method.unimodal_heads='fusion_split' takes each modality's logits from the fusion "
                              f"head, which model.fusion={setup.fusion!r} does not split by modality; use "
                              "model.fusion=concat|sum|late, or method.unimodal_heads=private")

    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.heads is None:
            return self.fusion.per_modality(feats)
        return {m: self.heads[m](feats[m]) for m in self.modality_names}

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            loss_mm = self.cross_entropy(self.fusion(feats), labels)
            losses = {m: self.cross_entropy(z, labels) for m, z in self.unimodal_logits(feats).items()}
        params = list(self.trainable())
        g_mm = ctx.grad(loss_mm, params, retain_graph=True, allow_unused=True)
        g_u = ctx.grad(sum(losses.values()), params, allow_unused=True)
        with torch.no_grad():
            grads, stats = self.integrate(params, g_mm, g_u)
        for p, g in zip(params, grads):
            p.grad = g
        ctx.step()
        total = loss_mm.detach() + sum(v.detach() for v in losses.values())
        return {"loss": total, "loss.mm": loss_mm.detach(), **{f"loss.{m}": v.detach() for m, v in losses.items()},
                **stats}

    def integrate(self, params: list[nn.Parameter], g_mm: Sequence[torch.Tensor | None],
                  g_u: Sequence[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        """The gradient each parameter is stepped with, and the per-encoder diagnostics."""
        position = {id(p): i for i, p in enumerate(params)}
        owned = {m: [position[id(p)] for p in self.encoders[m].parameters()
                     if id(p) in position and (g_mm[position[id(p)]] is not None or g_u[position[id(p)]] is not None)]
                 for m in self.modality_names}
        in_encoders = {i for own in owned.values() for i in own}
        # the heads': the gradient of L_mm + sum_m L_m
        grads = [None if i in in_encoders else add(a, b) for i, (a, b) in enumerate(zip(g_mm, g_u))]
        stats = {}
        for m, own in owned.items():
            if not own:  # a frozen encoder, or one no loss reaches: nothing to integrate
                continue
            sizes = [params[i].numel() for i in own]
            a, b = (torch.cat([flat(g[i], params[i]) for i in own]) for g in (g_mm, g_u))
            plain = a + b
            if self.params.grads == "accumulated":  # BalanceBenchmark reads g_mm + g_u for both
                a = b = plain
            mm, mu, uu = gram(a, b)
            w = multimodal_weight(mm, mu, uu, self.params.pareto)
            final = combine(a, b, w, self.params.gamma, sizes)
            for i, g in zip(own, final.split(sizes)):
                grads[i] = g.view_as(params[i])
            cos = cosine(mm, mu, uu)
            stats |= {f"cos.{m}": cos, f"conflict.{m}": (cos <= 0).float(), f"w_mm.{m}": w,
                      f"boost.{m}": ratio(torch.linalg.vector_norm(final), torch.linalg.vector_norm(plain))}
        return grads, stats

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.unimodal_logits(feats))


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


def flat(g: torch.Tensor | None, p: nn.Parameter) -> torch.Tensor:
    """g as a flat vector; zeros for a tensor one of the two losses does not reach."""
    return (torch.zeros_like(p) if g is None else g).flatten()


def ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x / y, and 1 where y = 0 (no gradient at all: nothing was enhanced)."""
    return torch.where(y > 0, x / y, torch.ones_like(y))
