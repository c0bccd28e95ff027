"""AGM: adaptive gradient modulation through Shapley mono-modal responses (Li et al., ICCV 2023).

Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation", ICCV 2023 (arXiv 2308.07686). Released code: lihong2303/AGM_ICCV2023 (also
lihongcs/AGM) at 5a65542c70b1; cited below as `run/CREMAD_main.py` (two modalities) and
`run/URFunny_main.py` (three), with `model/CREMAD_net.py` / `model/URFunny_net.py` (GradMod).
The paper's method section could not be read (only its abstract is reachable), so the variants
are the two released implementations; the default is the paper's own release.

The model is any fusion model f (encoders + fusion head). v(S) is its output with the inputs of
the modalities outside S replaced by zeros (the raw input, fed through the encoder), computed in
EVAL mode (BatchNorm's running statistics, no dropout) for every S but the full set. Per step:

1. Mono-modal responses, Shapley style (`mono_modal_responses`):
   m_i = sum over non-empty S in N \\ {i} of w(|S|) (v(S + i) - v(S)) + w(0) v({i}),
   w(k) = k! (M-k-1)! / M!. This is the Shapley value of modality i plus v(empty)/M, which is how
   the code writes it (v(empty) cancels out of m_i; CREMAD_net.py:6-17 for M = 2,
   URFunny_net.py:6-31 for M = 3), so that sum_i m_i = v(N): the fused output.
2. Scores: s_i = mean over the batch of -log softmax(m_i)[y], a probability below 1e-8 counted as
   1e-8 (CREMAD_main.py:130-143).
3. Discrepancy ratios: r_i = exp(M/(M-1) (mean_j s_j - s_i)), i.e. exp(mean of the others' s - s_i)
   (CREMAD_main.py:145-146 writes exp(s_v - s_a); URFunny_main.py:117-126 the 3/2 form), and the
   same from the running scores before this step, the "optimal" ratio r*_i (lines 148-149).
4. Coefficients kappa_i = exp(alpha min(r*_i - r_i, cap)) (line 151-152; cap 10 on CREMA-D, 7 on
   UR-Funny, none on AVE/AV-MNIST); then the running scores are updated,
   s*_i <- s*_i (t-1)/t + s_i/t, t the 1-based global step (line 154-155). They persist across
   epochs, and are updated at every step, inside the modulation window or not.
5. Inside the window, the gradient that reaches m_i is multiplied by kappa_i: the loss is the
   cross-entropy of sum_i m_i, each m_i behind a backward hook scaling its gradient (GradMod,
   CREMAD_net.py:25-69, hooks at 45-51), so the gradient flows through the eval-mode passes too.
   Outside the window the code does not reset the hooks' scale: before the window it is 1 (its
   initial value), after it the LAST coefficient of the window stays in force
   (`hold_after_window`, default True as the code; False: 1 after the window).
6. Gradient clipping, at every step: if any entry of the fusion head's output weights' gradient
   is above `clip_threshold` in absolute value, all gradients are clipped to total norm
   `clip_threshold` (CREMAD_main.py:232-243: threshold 1; URFunny_main.py:203-207: 5).
7. One optimizer step.

With kappa = 1 the gradient equals joint training's (the eval-path terms of sum_i m_i cancel), so
alpha = 0 without clipping is joint training.

`variant` (default "release"):
- "release": as above.
- "balancebenchmark": BalanceBenchmark's AGMTrainer (GeWu-Lab/BalanceBenchmark at 4c1482fca5aa,
  balancemm/trainer/AGM_trainer.py, `newGrad` lines 221-275 and `training_step` lines 535-589). It
  differs in every step but the scores (numbered as the steps above): (1) the responses are
  Shapley values WITHOUT the S = empty term (generate_all_combinations(..., include_empty=False)):
  m_i = sum over non-empty S of w(|S|) (v(S + i) - v(S)), all v (v(N) included) in eval mode
  under no_grad, computed BEFORE the train-mode pass (so with the BatchNorm statistics of the
  previous step; the release's come after it); (3) the ratios have
  the opposite sign: r_i = exp(M/(M-1) (s_i - mean_j s_j)), and r*_i likewise; (4) cap 7; (5) the
  loss is the plain cross-entropy of the train-mode output, and after its backward every encoder
  parameter of modality i with more than one dimension (not biases, not BatchNorm) has its
  gradient multiplied by kappa_i; the fusion head is never scaled; there is no window (its
  modulation_starts/ends are read but unused); (6) threshold 5. Its defaults: alpha 0.1
  (configs/trainer_config.yaml), cap 7, threshold 5.

Defaults by variant (a key given in the config wins): release alpha 1.0 (the code's argparse
default; the maintainers give 1.5 for CREMA-D, 2.5 AV-MNIST, 4.0 UR-Funny: lihongcs/AGM#10),
ratio_cap 10, clip_threshold 1; balancebenchmark alpha 0.1, ratio_cap 7, clip_threshold 5.
`ratio_cap: null` and `clip_threshold: null` switch the cap and the clipping off.

Departures, none of which changes a number beyond rounding (the tests check 1e-5 against both):
- v(S) is assembled from features: each encoder runs once in eval mode on its real input and once
  on a single all-zero sample (eval mode treats samples independently, so one zero sample stands
  for the batch), and the fusion head is applied to each coalition's features. The code runs the
  whole network once per coalition (2^M - 1 times, plus a v(empty) it never uses).
- The modulation window counts epochs from 0 (the harness), the code from 1: its window [s, e] is
  modulation_starts = s - 1, modulation_ends = e - 1 here. `modulation_ends: null` = to the end.
- t is a step counter kept in a buffer (the code's (epoch-1) * batches + step + 1, equal when every
  epoch has the same number of batches); scores, ratios and coefficients are float64 tensors on
  the device (the code: Python floats from .item()), so a step never waits for the GPU.
- The fusion head's output weights: `fc_out` (concat, FiLM, gated) or every private head (sum,
  late); the code's late fusion reads `fusion_module.fc_out`, its early fusion `head.fc`.
- BalanceBenchmark selects the scaled parameters by the modality's name inside the parameter name;
  here by module membership (`encoders[m]`), which is the same set without the substring pitfall.
- Under bf16 autocast the responses are summed, and their gradients scaled, in float32.

Cost per step: each encoder is called three times (once in training mode, once in eval mode on
the batch, once on one zero sample; the harness counts 3 forward passes), the fusion head 2^M - 1
times, one backward pass (through the eval-mode graphs too, for the release) and one step.

Logged per step (averaged per epoch): `score.<m>` (s_m), `ratio.<m>` (r_m), `optimal_ratio.<m>`
(r*_m), `coef.<m>` (kappa_m, computed at every step), `modulated` (1 inside the window) and
`clipped` (1 when the gradients were clipped; with a threshold only). `predict` gives v(N) (eval mode) as the fused
output and the variant's responses m_i as each modality's own logits. M >= 2 modalities.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import PositiveFloat, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import Fusion, LateFusion, SumFusion, build_fusion

SCORE_FLOOR = 1e-8  # a true-class probability below this counts as this (the code's guard)
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "release": {"alpha": 1.0, "ratio_cap": 10.0, "clip_threshold": 1.0},
    "balancebenchmark": {"alpha": 0.1, "ratio_cap": 7.0, "clip_threshold": 5.0},
}

Coalition = frozenset[str]


class AGMParams(Window):
    variant: Literal["release", "balancebenchmark"] = "release"
    alpha: float = tunable(1.0, 0.1, 5.0, log=True, ge=0)
    ratio_cap: PositiveFloat | None = 10.0  # None: no cap (the code on AVE and AV-MNIST)
    clip_threshold: PositiveFloat | None = 1.0  # None: never clip
    hold_after_window: bool = True

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        """The variant's alpha, cap and threshold where the config gives none."""
        if isinstance(data, dict):
            return {**VARIANT_DEFAULTS.get(data.get("variant", "release"), {}), **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AGMParams:
        windowed = self.modulation_starts != 0 or self.modulation_ends is not None or not self.hold_after_window
        if self.variant == "balancebenchmark" and windowed:
            raise ValueError("modulation_starts/modulation_ends/hold_after_window apply only to variant='release': "
                             "BalanceBenchmark's AGMTrainer modulates at every step; remove them or set "
                             "method.variant=release")
        return self


# ------------------------------------------------------------------ Shapley responses (pure)


def coalitions(modalities: Sequence[str]) -> list[Coalition]:
    """Every non-empty subset of the modalities, smallest first."""
    return [frozenset(c) for k in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, k)]


def shapley_weight(size: int, total: int) -> float:
    """w(k) = k! (M-k-1)! / M!: the weight of a coalition of `size` others joined by one modality."""
    return math.factorial(size) * math.factorial(total - size - 1) / math.factorial(total)


def mono_modal_responses(values: dict[Coalition, torch.Tensor], modalities: Sequence[str],
                         with_singleton: bool) -> dict[str, torch.Tensor]:
    """m_i = sum over non-empty S without i of w(|S|) (v(S + i) - v(S)), plus w(0) v({i}) when
    `with_singleton` (the release: the Shapley value plus v(empty)/M; BalanceBenchmark: without)."""
    n, out = len(modalities), {}
    for i in modalities:
        others = [m for m in modalities if m != i]
        terms = [shapley_weight(len(s), n) * (values[s | {i}] - values[s]) for s in coalitions(others)]
        if with_singleton:
            terms.append(shapley_weight(0, n) * values[frozenset({i})])
        out[i] = sum(terms[1:], terms[0])
    return out


# ------------------------------------------------------------- ratios and coefficients (pure)


def response_scores(responses: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """s_m = mean over the batch of -log softmax(m)[y], probabilities below 1e-8 counted as 1e-8
    (float64 0-d tensors)."""
    out = {}
    for m, logits in responses.items():
        p = F.softmax(logits.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
        out[m] = -torch.log(p.clamp_min(SCORE_FLOOR)).mean().double()
    return out


def discrepancy_ratios(scores: dict[str, torch.Tensor], sign: int) -> dict[str, torch.Tensor]:
    """r_m = exp(sign M/(M-1) (mean_j s_j - s_m)): sign +1 the release, -1 BalanceBenchmark."""
    n = len(scores)
    mean = sum(scores.values()) / n
    return {m: torch.exp(sign * n / (n - 1) * (mean - s)) for m, s in scores.items()}


def modulation_coefficients(ratios: dict[str, torch.Tensor], optimal: dict[str, torch.Tensor], alpha: float,
                            cap: float | None) -> dict[str, torch.Tensor]:
    """kappa_m = exp(alpha min(r*_m - r_m, cap))."""
    gap = {m: optimal[m] - ratios[m] for m in ratios}
    return {m: torch.exp(alpha * (g if cap is None else g.clamp_max(cap))) for m, g in gap.items()}


def running_mean(mean: torch.Tensor, value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mean of t values from that of the first t - 1 (t is 1-based)."""
    return mean * (t - 1) / t + value / t


# ------------------------------------------------------------------- gradient plumbing (pure)


class ScaleGrad(torch.autograd.Function):
    """The identity forward; the gradient times k backward (the code's backward hook)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.k.to(grad.dtype), None


def output_weights(fusion: Fusion) -> list[torch.Tensor]:
    """The weights of the fusion head's output layer(s), whose gradient decides the clipping."""
    if isinstance(fusion, (SumFusion, LateFusion)):
        return [h.weight for h in fusion.heads.values()]
    return [fusion.fc_out.weight]


@torch.no_grad()
def clip_if_large(parameters: Iterable[nn.Parameter], watched: Sequence[torch.Tensor],
                  threshold: float) -> torch.Tensor:
    """Clip all gradients to total norm `threshold` when a watched gradient has an entry beyond
    +-threshold; returns 1.0 if it clipped, else 0.0 (a tensor: no host sync)."""
    with_grad = [p for p in parameters if p.grad is not None]
    large = torch.stack([w.grad.abs().max() for w in watched if w.grad is not None]).max() > threshold
    total = nn.utils.get_total_norm([p.grad for p in with_grad])
    # a total norm of 0 makes the clip factor 1 (clamped), so a small gradient is left as it is
    nn.utils.clip_grads_with_norm_(with_grad, threshold, torch.where(large, total, torch.zeros_like(total)))
    return large.float()


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block, every submodule's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ------------------------------------------------------------------------------------ the method


@METHODS.register("agm")
class AGM(Method):
    family = "optimisation"
    Params = AGMParams

    def __init__(self, params: AGMParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method agm compares modalities, so it needs at least 2; this dataset has "
                              f"{len(names)}: {', '.join(names)}")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        self.release = params.variant == "release"
        self.all_coalitions = coalitions(names)
        self.full = frozenset(names)
        # the running scores s*, the step count t and the scale the hooks hold outside the window
        self.register_buffer("running_scores", torch.zeros(len(names), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("held", torch.ones(len(names), dtype=torch.float64))

    # ---- coalition values
    def coalition_values(self, inputs: dict[str, torch.Tensor],
                         train_feats: dict[str, torch.Tensor] | None) -> dict[Coalition, torch.Tensor]:
        """v(S) for every non-empty S, in eval mode; v(N) from `train_feats` when given."""
        with evaluating(self):
            real = self.encode(inputs)
            zero = self.encode({m: torch.zeros_like(x[:1]) for m, x in inputs.items()})
        values = {}
        for s in self.all_coalitions:
            if s == self.full and train_feats is not None:
                values[s] = self.fusion(train_feats)
                continue
            values[s] = self.fusion({m: real[m] if m in s else zero[m].expand_as(real[m]) for m in real})
        return values

    def responses(self, values: dict[Coalition, torch.Tensor]) -> dict[str, torch.Tensor]:
        return mono_modal_responses(values, self.modality_names, with_singleton=self.release)

    # ---- the coefficient
    def coefficients(self, responses: dict[str, torch.Tensor],
                     labels: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Scores, ratios and kappa of this step; advances the running scores and t."""
        names, p = self.modality_names, self.params
        sign = 1 if self.release else -1
        scores = response_scores(responses, labels)
        running = dict(zip(names, self.running_scores))
        ratios, optimal = discrepancy_ratios(scores, sign), discrepancy_ratios(running, sign)
        coefs = modulation_coefficients(ratios, optimal, p.alpha, p.ratio_cap)
        self.steps += 1
        self.running_scores.copy_(running_mean(self.running_scores, torch.stack([scores[m] for m in names]),
                                               self.steps))
        return {"score": scores, "ratio": ratios, "optimal_ratio": optimal, "coef": coefs}

    def in_window(self, epoch: int) -> bool:
        p = self.params
        return p.in_window(epoch)

    def hook_scales(self, coefs: dict[str, torch.Tensor], active: bool) -> torch.Tensor:
        """The release's hook scales: kappa inside the window (and held), else the held or 1."""
        if active:
            self.held.copy_(torch.stack([coefs[m] for m in self.modality_names]))
            return self.held
        return self.held if self.params.hold_after_window else torch.ones_like(self.held)

    @torch.no_grad()
    def scale_encoder_grads(self, coefs: dict[str, torch.Tensor]) -> None:
        """BalanceBenchmark: every encoder tensor of more than one dimension, times its kappa."""
        for m in self.modality_names:
            for p in self.encoders[m].parameters():
                if p.grad is not None and p.dim() != 1:
                    p.grad.mul_(coefs[m].to(p.grad.dtype))

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        active = self.in_window(ctx.epoch)  # always, for BalanceBenchmark (no window)
        with ctx.autocast():
            if self.release:  # the train-mode pass first: the eval passes see its BatchNorm update
                feats = self.encode(batch.inputs)
                responses = self.responses(self.coalition_values(batch.inputs, feats))
            else:  # the eval passes first, without a graph, as BalanceBenchmark's newGrad
                with torch.no_grad():
                    responses = self.responses(self.coalition_values(batch.inputs, None))
                feats = self.encode(batch.inputs)
        found = self.coefficients(responses, batch.labels)
        with ctx.autocast():
            if self.release:
                scales = self.hook_scales(found["coef"], active)
                # in float32, so that kappa scales the gradient unrounded under bf16 autocast
                fused = sum(ScaleGrad.apply(responses[m].float(), scales[k]) for k, m in enumerate(self.modality_names))
            else:
                fused = self.fusion(feats)
            loss = self.cross_entropy(fused, batch.labels)
        ctx.backward(loss)
        if not self.release:
            self.scale_encoder_grads(found["coef"])
        out = {"loss": loss.detach(), "modulated": torch.tensor(float(active))}
        if self.params.clip_threshold is not None:
            out["clipped"] = clip_if_large(self.parameters(), output_weights(self.fusion), self.params.clip_threshold)
        ctx.step()
        for key, per_modality in found.items():
            out.update({f"{key}.{m}": v.float() for m, v in per_modality.items()})
        return out

    def predict(self, batch: Batch) -> Prediction:
        values = self.coalition_values(batch.inputs, None)
        return Prediction(values[self.full], self.responses(values))
