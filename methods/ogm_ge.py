"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Joint training (one fused cross-entropy, one backward, one step) plus, between backward and
step, a per-modality rescaling of the encoders' gradients:

1. Each modality's unimodal logits are estimated from the fusion head (`unimodal_estimates`):
   concat: that modality's block of the weights times its feature plus bias/M; sum: that
   modality's own linear head with its FULL bias (the reference code halves the bias only at
   evaluation, so training uses the full one); late: that modality's private head.
   FiLM and gated fusion do not split by modality (the reference code crashes on them), so this
   method adds one auxiliary linear head per modality on the DETACHED features, trained by its
   own cross-entropy (added to the loss, reported as `aux_loss`). Detached, they never change
   the encoders or the fusion head; they exist only to estimate the ratio, and `predict` gives
   their logits as the per-modality view for these fusions.
2. Scores are batch SUMS of the ground-truth-class softmax: s_m = sum_i softmax(o_m,i)[y_i].
3. Ratios and coefficients (`discrepancy_ratios`, `modulation_coefficients`). For two modalities
   this is the paper's Eq. 10 as the code writes it: rho_v = s_v / s_a, rho_a = 1 / rho_v; if
   rho_v > 1 then k_v = 1 - tanh(alpha rho_v), k_a = 1, else k_a = 1 - tanh(alpha rho_a),
   k_v = 1. For M >= 3 it is the MLA repository's 3-modality rule: rho_m = s_m / sum of the
   others' s; the modalities are checked in a fixed order and the first one with rho > 1 gets
   k = 1 - tanh(alpha rho), the others 1; if none of the checked ones has rho > 1, the last
   modality of the order is modulated anyway. That repo checks (visual, text) and falls back to
   audio, with its modalities ordered (audio, visual, text); here the check order is the
   dataset's modalities from the second on, then the first (`check_order`), which gives exactly
   that order for (audio, visual, text) and, for two modalities (audio, visual), Eq. 10 above.
4. Inside the window `modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based, as
   the code), each selected gradient g of modality m becomes
   ogm:    g <- k_m g
   ogm_ge: g <- k_m g + N(0, sigma^2) element-wise, sigma = std(g) (un-modulated, unbiased) + 1e-8,
   per tensor. Parameters are selected by MODULE membership (the parameters of
   `encoders[m]`), never by the position of a token in their name: the reference code's
   `name.split('.')[1]` works only under DataParallel's `module.` prefix and modulates nothing
   on a single-GPU run. The noise comes from the global torch RNG, which the harness
   checkpoints, so resume is exact; tensors are visited in the dataset's modality order, then
   in `encoders[m].parameters()` order.

The journal version (Wei, Hu, Du & Wen, TPAMI 2024, "On-the-fly Modulation for Balanced
Multimodal Learning"; release GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f, code/main.py L116-169 with the
scores of code/models/Classifier.py L112-143) computes the same scores (concat split, bias/2), the
same k = 1 - tanh(alpha rho), the same conv-only selection (by module: its model is not wrapped
in DataParallel) and the same noise, but decides the modulated modality the other way round:
`radio_1 = s_a / s_v`; if radio_1 > 1 audio gets 1 - tanh(alpha radio_1), else visual gets
1 - tanh(alpha s_v / s_a), each ratio computed directly. It differs from the CVPR rule above only
when s_a = s_v exactly (CVPR modulates audio, TPAMI visual) and in the last bit of the reciprocal
ratio; `ratio_rule=tpami` gives it: modalities checked in the dataset's order, the last one the
default, each rho_m = s_m / (sum of the others) computed directly (for M >= 3 the same
generalisation as the CVPR rule's; the release defines two modalities). Its other differences are
settings, not rules: a hard-coded warm-up (main.py L91, no modulation in epochs 0-5, i.e.
modulation_starts=6), AdamW, and the `--use_OGM_plus` branch (L128-136: a constant 4 for the
weaker modality's gradients; no script sets it, and it is not implemented here).

Paper vs code switches. The paper does not say which parameters are modulated; the default is
the code's, as everywhere the paper is silent:
- `param_filter`: `conv_only` (code) modulates only 4-D tensors (Conv2d kernels; BN, linear
  layers, the fusion head are never touched); `all_encoder` modulates every parameter of the
  encoders.
- `ratio_rule`: `cvpr` (the CVPR release, default) or `tpami` (the journal's release), above.
- `noise_on`: `both` (code) adds the GE noise to every modality's selected gradients, also the
  one whose k = 1; `modulated_only` adds it only to the modality whose k < 1. It applies only to
  `modulation=ogm_ge`.

Each step reports `loss` (the fused cross-entropy, as joint training reports it), `ratio.<m>`
(rho_m), `coef.<m>` (k_m) and `modulated` (1 inside the window, else 0); the harness averages
them over the epoch. For late fusion the loss is the cross-entropy of the averaged logits
(joint's `late_loss=fused`), since OGM-GE modulates the gradient of one fused loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import ConcatFusion, LateFusion, SumFusion, build_fusion, linear

NOISE_EPS = 1e-8  # added to the noise std, as the reference code does


class OGMGEParams(Window):
    # README of the reference code: 0.8 for CREMA-D, 0.1 for VGGSound
    alpha: float = tunable(0.8, 0.05, 1.5, ge=0)
    modulation: Literal["ogm_ge", "ogm"] = "ogm_ge"
    modulation_ends: int = Field(50, ge=0)
    param_filter: Literal["conv_only", "all_encoder"] = "conv_only"
    noise_on: Literal["both", "modulated_only"] = "both"
    # which modality is checked first and how the two-modality ratios are computed (docstring)
    ratio_rule: Literal["cvpr", "tpami"] = "cvpr"

    @model_validator(mode="after")
    def _consistent(self) -> OGMGEParams:
        if self.modulation == "ogm" and self.noise_on != "both":
            raise ValueError(
                f"noise_on={self.noise_on!r} applies only to modulation='ogm_ge' (ogm adds no noise); "
                "remove it or set method.modulation=ogm_ge"
            )
        return self


# ------------------------------------------------------------------ the coefficient (pure functions)


def check_order(modalities: Sequence[str], rule: str = "cvpr") -> tuple[str, ...]:
    """The order in which modalities are checked for rho > 1; the last one is the default.

    cvpr: the dataset's modalities from the second on, then the first: (audio, visual, text) ->
    (visual, text, audio), the MLA repo's order; (audio, visual) -> (visual, audio), Eq. 10.
    tpami: the dataset's order, (audio, visual) as main.py L138-148 checks them.
    """
    return tuple(modalities) if rule == "tpami" else (*modalities[1:], modalities[0])


def ground_truth_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s = sum over the batch of the softmax probability of the true class (a 0-d tensor)."""
    return F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).sum()


def discrepancy_ratios(scores: dict[str, torch.Tensor], order: Sequence[str],
                       reciprocal: bool = True) -> dict[str, torch.Tensor]:
    """rho_m = s_m / sum of the other modalities' scores.

    For two modalities with `reciprocal` (the CVPR code) rho_first = s_first / s_last and
    rho_last = 1 / rho_first, so that it reproduces Eq. 10 bit for bit; without it (the TPAMI
    code) each ratio is computed directly.
    """
    if len(order) == 2 and reciprocal:
        first, last = order
        ratio = scores[first] / scores[last]
        return {first: ratio, last: 1 / ratio}
    return {m: scores[m] / sum(scores[o] for o in scores if o != m) for m in scores}


def modulation_masks(ratios: dict[str, torch.Tensor], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """Which modality is modulated, as 0-d bool tensors: the first of order[:-1] with rho > 1, or
    order[-1] if none of them has it (whatever its rho). Tensors, not a Python choice, so that
    the step never waits for the GPU."""
    masks = {}
    none_yet = torch.ones_like(ratios[order[0]], dtype=torch.bool)
    for m in order[:-1]:
        masks[m] = none_yet & (ratios[m] > 1)
        none_yet = none_yet & ~masks[m]
    masks[order[-1]] = none_yet
    return masks


def modulation_coefficients(ratios: dict[str, torch.Tensor], order: Sequence[str],
                            alpha: float) -> dict[str, torch.Tensor]:
    """k_m for every modality: 1 - tanh(alpha rho_m) for the modulated one, 1 for the others.
    The reference code's ReLU around rho is left out: rho > 0."""
    masks = modulation_masks(ratios, order)
    return {m: torch.where(masks[m], 1 - torch.tanh(alpha * ratios[m]), torch.ones_like(ratios[m])) for m in order}


def modulated_modality(ratios: dict[str, torch.Tensor], order: Sequence[str]) -> str:
    """The name of the modulated modality (reads the values: for logs and tests, not the step)."""
    masks = modulation_masks(ratios, order)
    return next(m for m in order if bool(masks[m]))


# ------------------------------------------------------------------------------------ the method


@METHODS.register("ogm_ge")
class OGMGE(Method):
    family = "optimisation"
    Params = OGMGEParams

    def __init__(self, params: OGMGEParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.fusion_name = setup.fusion
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        self.order = check_order(self.modality_names, params.ratio_rule)
        # FiLM/gated have no per-modality split: auxiliary heads on detached features give the
        # unimodal estimates (built after the fusion, so encoders and fusion start as joint's)
        self.aux_heads: nn.ModuleDict | None = None
        if not isinstance(self.fusion, (ConcatFusion, SumFusion, LateFusion)):
            self.aux_heads = nn.ModuleDict(
                {m: linear(d, setup.num_classes) for m, d in setup.feature_dims().items()}
            )

    # ---- unimodal estimates used only for the ratio
    @torch.no_grad()
    def unimodal_estimates(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training-time unimodal logits for concat, sum and late fusion (float32, no grad)."""
        fusion = self.fusion
        feats = {m: f.float() for m, f in feats.items()}
        if isinstance(fusion, ConcatFusion):
            return fusion.per_modality(feats)  # that modality's block of the weights, bias / M
        if isinstance(fusion, (SumFusion, LateFusion)):
            # sum: the full bias in training (the /M split is only for evaluation)
            return {m: F.linear(feats[m], h.weight.float(), h.bias.float()) for m, h in fusion.heads.items()}
        raise RuntimeError(f"fusion {self.fusion_name!r} has no split; its estimates come from the aux heads")

    def aux_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.aux_heads is not None
        return {m: self.aux_heads[m](feats[m].detach()) for m in self.modality_names}

    # ---- gradient modulation
    def in_window(self, epoch: int) -> bool:
        return self.params.in_window(epoch)

    def modulated_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per modality, the tensors whose gradients are modulated: membership by module."""
        conv_only = self.params.param_filter == "conv_only"
        return {
            m: [p for p in self.encoders[m].parameters()
                if p.requires_grad and (p.dim() == 4 or not conv_only)]
            for m in self.modality_names
        }

    @torch.no_grad()
    def modulate_(self, coefs: dict[str, torch.Tensor]) -> None:
        ge = self.params.modulation == "ogm_ge"
        for m, tensors in self.modulated_parameters().items():
            k = coefs[m]
            # modulated_only: the noise is masked, not skipped, so the step never reads k on the host
            gate = None if self.params.noise_on == "both" else (k < 1).to(k.dtype)
            for p in tensors:
                g = p.grad
                if g is None:
                    continue
                # in place, and the same operations in the same order as g * k + noise * sigma:
                # no gradient-sized temporaries beyond the noise
                if ge:
                    # std of a 1-element tensor is undefined; give it no noise rather than NaN
                    sigma = (g.std() if g.numel() > 1 else torch.zeros((), device=g.device)) + NOISE_EPS
                    noise = torch.randn_like(g).mul_(sigma)
                    g.mul_(k).add_(noise if gate is None else noise.mul_(gate))
                else:
                    g.mul_(k)

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch.labels
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            loss = self.cross_entropy(self.fusion(feats), labels)
            aux = self.aux_logits(feats) if self.aux_heads is not None else None
            aux_loss = sum(self.cross_entropy(a, labels) for a in aux.values()) if aux is not None else None
        ctx.backward(loss if aux_loss is None else loss + aux_loss)

        if aux is not None:
            estimates = {m: a.detach() for m, a in aux.items()}
        else:
            estimates = self.unimodal_estimates(feats)
        with torch.no_grad():
            scores = {m: ground_truth_scores(estimates[m], labels) for m in self.modality_names}
            ratios = discrepancy_ratios(scores, self.order, reciprocal=self.params.ratio_rule == "cvpr")
            coefs = modulation_coefficients(ratios, self.order, self.params.alpha)
        active = self.in_window(ctx.epoch)
        if active:
            self.modulate_(coefs)
        ctx.step()

        out = {"loss": loss.detach()}
        if aux_loss is not None:
            out["aux_loss"] = aux_loss.detach()
        for m in self.modality_names:
            out[f"ratio.{m}"] = ratios[m]
            out[f"coef.{m}"] = coefs[m]
        out["modulated"] = torch.tensor(float(active))
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        if self.aux_heads is not None:
            # film/gated: the auxiliary heads are this method's per-modality view
            own = {m: self.aux_heads[m](feats[m]) for m in self.modality_names}
            return Prediction(self.fusion(feats), own)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
