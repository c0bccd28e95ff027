"""LFM: dynamically weighted supervised and alignment objectives (Yang et al., NeurIPS 2024).

Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via Dynamically Learning Modality
Gap", NeurIPS 2024. Released code: njustkmg/NeurIPS24-LFM at ad44fa09fee4, cited below as
`Crema_epoch.py` (the "fitted" schedule, the one its README runs) and `Crema_epoch_learnable.py`
(the "learned" schedule), with `model/AudioVideo.py` (the model). The paper's method section could
not be read (only its abstract: it integrates "unsupervised contrastive learning and supervised
multimodal learning", by a heuristic and by a learning-based strategy); the variants are the two
released implementations, and the default is the paper's own release.

The model is the encoders plus a fusion head that gives each modality its own logits o_m (the
release: a private linear head per modality and the fused logits their mean, 0.5 o_a + 0.5 o_v,
AudioVideo.py:46-63 and Crema_epoch.py:70 = `model.fusion: late`; BalanceBenchmark: concat fusion,
o_m the modality's block of the fused layer plus bias / M = `model.fusion: concat`). Per step:

1. L_cls = cross-entropy of the fused logits (Crema_epoch.py:70).
2. L_align = mean over modality pairs (m, n) of "Alignment"(o_m, o_n) = 0.5 (KL(r || p) + KL(r || q)),
   p, q the softmaxes of o_m, o_n and r = (p + q) / 2, each KL averaged over the batch
   (Crema_epoch.py:38-45, 69: `F.kl_div(p.log(), m)` is KL(m || p), so this is the reversed-argument
   Jensen-Shannon form; written as the code has it). The release defines one pair (M = 2);
   BalanceBenchmark's mean over all pairs (LFM_trainer.py:340-344, 347) is the same for M = 2 and
   is used for M >= 3.
3. loss = 2 (w_cls L_cls + w_align L_align) (Crema_epoch.py:71), one backward, one step.

The weights (w_cls, w_align) change with the epoch; `schedule` says how:
- "fitted" (Crema_epoch.py:47-53, 195): w_cls(e) = sum_i c_i e^i, a degree-5 polynomial in the
  0-based epoch fitted by the authors to a learned trajectory of 200 CREMA-D epochs (0.205 at epoch
  0, 0.40 at 39, 0.54 at 100, 1.01 at 180), and w_align(e) = sum_i c'_i e^i with c'_0 = 1 - c_0,
  c'_i = -c_i (so 1 - w_cls up to rounding). Evaluated at the raw epoch, as the code does.
- "learned" (Crema_epoch_learnable.py:55-97, 250-256): before each epoch's training, on a fixed
  small batch B (step 4 below), with the current weights,
      L_total = w_cls L_cls(B) + w_align L_align(B),
      g = mean of the entries of H_total g_cls restricted to the model's FIRST parameter tensor
          (the first encoder's first weight): autograd.grad(grad(L_total), params,
          grad_outputs=grad(L_cls))[0].mean(),
      lr_alpha <- lr_alpha / 2 at epochs 20, 40, ... (epoch % 20 == 0 and epoch != 0),
      w_align <- clip(w_align - lr_alpha g, 0.05, 0.95), w_cls = 1 - w_align.
  The weights and lr_alpha carry over from epoch to epoch (buffers: resume is exact). Only the
  first tensor's entry of the Hessian-vector product is used, as in the code; the product is taken
  with respect to that tensor alone, which gives the same entry at a fraction of the cost.
- "fixed": (1 - align_weight, align_weight) throughout: not in either code, the ablation handle.
  align_weight = 0 makes the loss 2 L_cls: joint training (`joint`, the same fusion, late_loss
  fused for late fusion) at twice the learning rate and half the weight decay, which SGD with
  momentum steps identically (tested).

`variant` (default "release"):
- "release": learned weights start at (w_cls, w_align) = (0.05, 0.95) (Crema_epoch_learnable.py:250);
  B is the first half of a 16-sample batch (lines 58-62: 8 samples); the hypergradient's forward
  pass runs in the model's mode at the time, which is training mode at epoch 0 and EVAL mode from
  epoch 1 on (the code's val() leaves the model in eval mode and getAlpha_Learnable does not switch
  it back; BatchNorm then uses its running statistics and is not updated). Default schedule: fitted.
- "balancebenchmark": BalanceBenchmark's LFMTrainer (GeWu-Lab/BalanceBenchmark at 4c1482fca5aa,
  balancemm/trainer/LFM_trainer.py:41-80, 146-150, 332-349). The learned schedule only (its
  `method: 'learning-fitted'` config key is read but unused); the weights start the other way
  round, (w_cls, w_align) = (0.95, 0.05) (line 146); B is the first quarter of its validation
  loader's first batch (lines 44-45; BalanceBenchmark's validation loader is the test split: 16
  samples of a batch of 64); the forward pass in training mode (line 149); L_align averaged over
  all pairs. Its model is concat fusion (`model.fusion: concat`).

Departures, none of which changes a step (the tests check 1e-5 against both codes):
- B is the first `hyper_samples` samples of the unshuffled training split (ctx.train_batches()),
  fetched again each epoch. The release draws 16 random training samples and holds them out of
  training; BalanceBenchmark takes its first test batch. The suite never trains on val or test,
  and has no held-out part of train, so these samples are also trained on.
- The weights are float64 buffers; the code keeps Python floats (also float64).
- Under bf16 autocast the cross-entropy and the softmaxes are computed in float32.

Cost per step: joint training's (1 forward and 1 backward per encoder, 1 step). Once per epoch
(learned schedule): one forward pass of every encoder on B and three autograd passes (the first
two with a graph: a double backward), counted by the harness.

Logged per step (averaged per epoch): `ce` (L_cls), `align` (L_align, the modality gap of the
predictions), `weight.cls`, `weight.align`; per epoch (learned schedule): `lr_alpha` and
`hypergrad` (g). `predict` gives the fusion head's fused logits and each modality's own o_m.
M >= 2 modalities (fusions with per-modality logits: late, concat, sum).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion

# Crema_epoch.py:49-50: the fitted weights' polynomial coefficients, constant term first
FITTED_CLS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
FITTED_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11)
WEIGHT_BOUNDS = (0.05, 0.95)  # the learned alignment weight is clipped to these (both codes)
LOSS_SCALE = 2.0  # loss = 2 (w_cls L_cls + w_align L_align), both codes
IGNORED_BY = {"fitted": ("align_weight", "lr_alpha", "halve_every", "hyper_samples"),
              "fixed": ("lr_alpha", "halve_every", "hyper_samples")}
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "release": {"schedule": "fitted", "align_weight": 0.95, "hyper_samples": 8},
    "balancebenchmark": {"schedule": "learned", "align_weight": 0.05, "hyper_samples": 16},
}


class LFMParams(Strict):
    variant: Literal["release", "balancebenchmark"] = "release"
    schedule: Literal["fitted", "learned", "fixed"] = "fitted"
    # the learned schedule's starting alignment weight, or the fixed schedule's weight
    # searched where a schedule reads it: [0.05, 0.95] are the learned schedule's clip bounds (R: w_align)
    align_weight: float = tunable(0.95, 0.05, 0.95, ge=0, le=1, when={"schedule": ["learned", "fixed"]})
    # the learned schedule's step size for the weight; a decade either side of the release's 1e-4
    lr_alpha: PositiveFloat = tunable(1e-4, 1e-5, 1e-3, log=True, when={"schedule": "learned"})
    halve_every: PositiveInt = 20  # lr_alpha halves at epochs halve_every, 2 halve_every, ...
    hyper_samples: PositiveInt = 8  # the size of the learned schedule's batch B

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        """The variant's schedule, starting weight and batch size where the config gives none; a
        value the schedule would ignore is refused rather than silently dropped."""
        if not isinstance(data, dict):
            return data
        defaults = {k: f.default for k, f in cls.model_fields.items()}
        defaults |= VARIANT_DEFAULTS.get(data.get("variant", "release"), {})
        merged = {**defaults, **data}
        # a stored config lists every key; only a value other than the default can be a mistake
        ignored = [k for k in IGNORED_BY.get(merged["schedule"], ()) if merged[k] != defaults[k]]
        if ignored:
            raise ValueError(f"method.{ignored[0]} has no effect with schedule={merged['schedule']!r} (lr_alpha, "
                             "halve_every and hyper_samples are the learned schedule's, align_weight the learned "
                             "and the fixed one's); remove it or set method.schedule")
        return merged

    @model_validator(mode="after")
    def _consistent(self) -> LFMParams:
        if self.variant == "balancebenchmark" and self.schedule != "learned":
            raise ValueError(f"schedule={self.schedule!r} with variant='balancebenchmark': BalanceBenchmark's "
                             "LFMTrainer has only the learned schedule; use method.variant=release for the "
                             "fitted or fixed one")
        return self


# ------------------------------------------------------------------------- objectives (pure)


def alignment(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """The code's "Alignment": 0.5 (KL(r || p) + KL(r || q)), r = (p + q) / 2, batch means."""
    p, q = F.softmax(p_logits.float(), dim=-1), F.softmax(q_logits.float(), dim=-1)
    r = 0.5 * p + 0.5 * q
    # F.kl_div(input=log p, target=r) is KL(r || p): the code's argument order, kept
    return 0.5 * (F.kl_div(p.log(), r, reduction="batchmean") + F.kl_div(q.log(), r, reduction="batchmean"))


def pairwise_alignment(per_modality: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of `alignment` over every pair of modalities (one pair for M = 2)."""
    pairs = list(itertools.combinations(per_modality.values(), 2))
    return sum(alignment(a, b) for a, b in pairs) / len(pairs)


def fitted_weights(epoch: int) -> tuple[float, float]:
    """(w_cls, w_align) of the fitted schedule at 0-based `epoch` (Python floats, as the code)."""
    return (sum(c * epoch**i for i, c in enumerate(FITTED_CLS)),
            sum(c * epoch**i for i, c in enumerate(FITTED_ALIGN)))


def learned_alignment_weight(align: float, hypergrad: float, lr_alpha: float) -> float:
    """One step of the learned schedule's weight: w_align - lr_alpha g, clipped to [0.05, 0.95]."""
    low, high = WEIGHT_BOUNDS
    return max(low, min(high, align - lr_alpha * hypergrad))


def first_samples(batches: Iterable[Batch], n: int) -> Batch:
    """The first `n` samples of a sequence of batches (fewer if the split is smaller)."""
    taken: list[Batch] = []
    for batch in batches:
        taken.append(batch)
        if sum(map(len, taken)) >= n:
            break
    if not taken:
        raise ConfigError("method lfm: the learned schedule draws its batch from the training split, which is empty")
    inputs = {m: torch.cat([b.inputs[m] for b in taken])[:n] for m in taken[0].inputs}
    return Batch(inputs, torch.cat([b.labels for b in taken])[:n])


# ------------------------------------------------------------------------------------ the method


@METHODS.register("lfm")
class LFM(Method):
    family = "objective"  # BalanceBenchmark's taxonomy (spec/peers.md section 1.6): LFM adjusts the loss
    Params = LFMParams

    def __init__(self, params: LFMParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method lfm aligns pairs of modalities, so it needs at least 2; this dataset has "
                              f"{len(names)}: {', '.join(names)}")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        probe = {m: torch.zeros(1, d) for m, d in setup.feature_dims().items()}
        if self.fusion.per_modality(probe) is None:
            raise ConfigError(f"method lfm aligns each modality's own logits, which model.fusion={setup.fusion!r} "
                              "does not give; use late (the release's private heads), concat (BalanceBenchmark's) "
                              "or sum")
        start = fitted_weights(0) if params.schedule == "fitted" else (1.0 - params.align_weight, params.align_weight)
        # (w_cls, w_align) in force, and the learned schedule's step size: state a resume restores
        self.register_buffer("weights", torch.tensor(start, dtype=torch.float64))
        self.register_buffer("lr_alpha", torch.tensor(params.lr_alpha, dtype=torch.float64))
        self.register_buffer("hypergrad", torch.zeros((), dtype=torch.float64))

    # ---- the objective
    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """L_cls and L_align of `batch` (under the harness's precision)."""
        with self.step_context.autocast():
            feats = self.encode(batch.inputs)
            fused, own = self.fusion(feats), self.fusion.per_modality(feats)
            return {"ce": self.cross_entropy(fused, batch.labels), "align": pairwise_alignment(own)}

    # ---- the weights
    def on_epoch_start(self, epoch: int) -> None:
        if self.params.schedule == "fitted":
            self.weights.copy_(torch.tensor(fitted_weights(epoch), dtype=torch.float64))
        elif self.params.schedule == "learned":
            self.learn_weights(epoch)

    def learn_weights(self, epoch: int) -> None:
        """The learned schedule's update before epoch `epoch` trains (see the module docstring)."""
        ctx, p = self.step_context, self.params
        hyper = first_samples(ctx.train_batches(), p.hyper_samples)
        was_training = self.training
        # the release's forward pass sees the mode its val() left: eval from epoch 1 on
        self.train(was_training and (p.variant == "balancebenchmark" or epoch == 0))
        try:
            found = self.losses(hyper)
        finally:
            self.train(was_training)
        w_cls, w_align = (float(w) for w in self.weights)
        params = list(self.trainable())
        total = w_cls * found["ce"] + w_align * found["align"]
        theta = ctx.grad(total, params, create_graph=True)
        cls = ctx.grad(found["ce"], params, retain_graph=True)
        # only the first tensor's entry is used: the product with respect to it alone
        linked = [(t, c) for t, c in zip(theta, cls, strict=True) if t.requires_grad]
        (first,) = ctx.grad([t for t, _ in linked], params[:1], grad_outputs=[c for _, c in linked],
                            allow_unused=True)
        hypergrad = 0.0 if first is None else first.mean().item()
        if epoch % p.halve_every == 0 and epoch != 0:
            self.lr_alpha /= 2
        align = learned_alignment_weight(w_align, hypergrad, float(self.lr_alpha))
        self.weights.copy_(torch.tensor([1.0 - align, align], dtype=torch.float64))
        self.hypergrad.fill_(hypergrad)

    def epoch_log(self) -> dict[str, Any]:
        if self.params.schedule != "learned":
            return {}
        return {"lr_alpha": float(self.lr_alpha), "hypergrad": float(self.hypergrad)}

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        found = self.losses(batch)
        # float32 weights times float32 losses: the code's Python floats enter its float32 graph so
        w_cls, w_align = self.weights.float()  # (and a tensor keeps the step free of host syncs)
        loss = LOSS_SCALE * (w_cls * found["ce"] + w_align * found["align"])
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "ce": found["ce"].detach(), "align": found["align"].detach(),
                "weight.cls": w_cls, "weight.align": w_align}

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
