"""MLA: alternating unimodal learning through one shared head (Zhang et al., CVPR 2024).

Multimodal Learning with Alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024,
arXiv 2311.10707).

Training alternates between modalities through ONE shared head h = Linear(d, C). Per batch every
encoder runs forward once, first (as the code does); then, in the dataset's modality
order, for each modality m: loss_m = CE(h(f_m), y), backward, head-gradient modification (HGM),
optimizer step, zero_grad. The head gets M updates per batch, each encoder one. h is re-applied
after the previous modality's step (the code's W'v + b'), while f_m comes from the pre-update
forward. Test time fuses sum_m lambda_m h(f_m); `per_modality` is h(f_m).

`hgm` (default "owm_paper"):
- "owm_paper": Eq. 3, P <- P - P h h^T P / (alpha + h^T P h), no normalisation. h is the batch
  mean of the PREVIOUSLY trained modality's features (the paper says "average feature"; a reviewer
  says it is the dataset mean, which is unspecified in detail and costs an extra pass per step, so
  we use the batch mean). Implemented as: the head gradient of step t is projected, grad_W P^T,
  with P built from the features of steps < t (P = I at the first step); right after step t, P is
  updated with step t's batch-mean feature (so the next step's P holds "the previous modality").
  alpha is that step's alpha. P is shared by all modalities and persists across epochs.
- "owm_code": the released GSPlugin as it would run with its guard fixed: on every call
  but the very first of training, r = batch mean of the CURRENT modality's features, k = P r^T,
  P <- P - k k^T / (alpha_i + k r), P <- P / ||P||_F, grad_W <- grad_W P^T; bias untouched.
  NOTE: the code writes `torch.mm(k, r)`, the d x d OUTER product, and divides elementwise; the
  scalar r k of OWM is `torch.mm(r, k)`. We reproduce the code.
- "additive": BalanceBenchmark's version: P updated as owm_code, grad_W <- grad_W + grad_W P^T.
- "off": no modification. This is the released HEAD, whose guard `n == "module.weight"` never
  matches the bare nn.Linear.
`owm_alpha`: None (default) = the code's schedule alpha_i = 0.1 ** (i/N + 1), i the batch index in
the epoch, N the batches per epoch (0.1 -> ~0.01 within each epoch); a number = that constant.
The paper's alpha is not recovered, so the paper variant uses the code's schedule by default.

`fusion_mode` (default "entropy"):
- "entropy" (paper): per sample, lambda = softmax over modalities of -e_m, e_m the class entropy
  of softmax(h(f_m)).
- "entropy_batch" (the code): softmax over the BATCH dimension and entropy summed over
  the whole B x C matrix: one scalar weight per modality per evaluation batch, so the result
  depends on train.eval_batch_size and on which samples share a batch. With the harness's eval batch
  of 512 the summed entropies differ by many nats and one modality takes nearly all the weight
  (AV-Digits: audio 1.0 early, 0.81-0.99 at epoch 32; fused accuracy = the audio head's).
- "fixed": `fixed_weights` {modality: weight}, summing to 1; by default the code's hard-coded
  0.55 / 0.45 for M = 2 and its a 0.35, v 0.25, t 0.4 for M = 3, given to the
  dataset's modalities by position (the code's order is audio, visual, text).
Entropies use log_softmax: where the code's log(softmax) underflows to NaN we stay finite.
Logged per epoch: `fusion_weight.<m>`, lambda_m averaged over the validation samples (each batch's
mean comes back in `Prediction.logs`; the harness weights the batches by size), and `p_fro`.

`legacy_zero_grad`: zero_grad(set_to_none=False) between the modality
steps, as torch 1.8 did, so each already-stepped encoder gets an extra momentum + weight-decay step
at every later modality's step; grads are set to None at the end of the batch (the code's
`del p.grad`). The code logs 0.55 la + 0.45 lv as its loss; we log the mean and each loss.m.

With one modality and hgm="off", MLA is exactly unimodal training (tested); the OWM variants still
project the head gradient there (against the previous step's features), so they differ from it.
Cost per batch: one forward per encoder, M backward passes, M optimizer steps, a d x d update of P.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, field_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import linear

# the code's fixed fusion weights by number of modalities, given to the modalities by position
CODE_FIXED_WEIGHTS = {1: (1.0,), 2: (0.55, 0.45), 3: (0.35, 0.25, 0.4)}


class MLAParams(Strict):
    hgm: Literal["owm_paper", "owm_code", "additive", "off"] = "owm_paper"
    owm_alpha: PositiveFloat | None = tunable(None, 0.01, 1.0, log=True)  # None: the code's schedule 0.1 ** (i/N + 1)
    fusion_mode: Literal["entropy", "entropy_batch", "fixed"] = "entropy"
    fixed_weights: dict[str, float] | None = None  # fusion_mode=fixed only; None: the code's
    legacy_zero_grad: bool = False

    @field_validator("hgm", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads `hgm: off` as false


# ------------------------------------------------------------------------- P updates (pure)


def owm_code_update(P: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """GSPlugin.before_update, line for line (denominator: the OUTER product k r, elementwise)."""
    r = r.reshape(1, -1)
    k = P @ r.t()
    P = P - (k @ k.t()) / (alpha + k @ r)
    return P / torch.linalg.matrix_norm(P)  # Frobenius norm


def owm_paper_update(P: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 3: P - P h h^T P / (alpha + h^T P h)."""
    h = h.reshape(-1, 1)
    Ph = P @ h
    return P - (Ph @ (h.t() @ P)) / (alpha + h.t() @ Ph)


# ------------------------------------------------------------------ fusion weights (pure)


def entropy(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """-sum p log p of softmax(logits, dim), summed over `dim` only."""
    logits = logits.float()
    return -(F.softmax(logits, dim) * F.log_softmax(logits, dim)).sum(dim)


def fusion_weights(mode: str, logits: dict[str, torch.Tensor], fixed: dict[str, float]) -> dict[str, torch.Tensor]:
    """lambda per modality: (B, 1) per sample ("entropy"), else 0-dim tensors."""
    if mode == "fixed":
        return {m: torch.tensor(fixed[m], device=z.device) for m, z in logits.items()}
    if mode == "entropy":  # paper: per-sample class entropy, softmax(-e) over modalities
        ent = torch.stack([entropy(z, dim=1) for z in logits.values()])  # M x B
        lam = F.softmax(-ent, dim=0).unsqueeze(-1)
    else:  # the code: softmax over the batch, entropy of the whole B x C matrix
        ent = torch.stack([entropy(z, dim=0).sum() for z in logits.values()])  # M
        lam = F.softmax(-ent, dim=0)
    return dict(zip(logits, lam))


@METHODS.register("mla")
class MLA(Method):
    family = "feed-forward"
    Params = MLAParams

    def __init__(self, params: MLAParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.order = tuple(m.name for m in setup.modalities)
        dims = setup.feature_dims(self.order)
        if len(set(dims.values())) != 1:
            shown = ", ".join(f"{m}={d}" for m, d in dims.items())
            raise ConfigError(f"method mla shares one head across modalities, so every encoder needs the same "
                              f"out_dim; got {shown}: set model.encoders.<modality>.out_dim to one value")
        d = dims[self.order[0]]
        self.head = linear(d, setup.num_classes)  # the code's weight_init: xavier-normal, zero bias
        self.register_buffer("P", torch.eye(d))
        self.register_buffer("hgm_calls", torch.zeros((), dtype=torch.long))
        self.fixed = self._fixed_weights(params)
        if params.owm_alpha is not None and params.hgm == "off":
            raise ConfigError("method.owm_alpha applies only to method.hgm=owm_paper|owm_code|additive (hgm is 'off')")

    def _fixed_weights(self, params: MLAParams) -> dict[str, float]:
        given = params.fixed_weights
        if given is not None and params.fusion_mode != "fixed":
            raise ConfigError(f"method.fixed_weights applies only to method.fusion_mode=fixed "
                              f"(fusion_mode is {params.fusion_mode!r}); remove it or set fusion_mode=fixed")
        if given is None:
            if params.fusion_mode == "fixed" and len(self.order) not in CODE_FIXED_WEIGHTS:
                raise ConfigError(f"method.fixed_weights has no default for {len(self.order)} modalities; "
                                  f"give one weight per modality: {', '.join(self.order)}")
            return dict(zip(self.order, CODE_FIXED_WEIGHTS.get(len(self.order), ())))
        if set(given) != set(self.order):
            raise ConfigError(f"method.fixed_weights must name each modality once: {', '.join(self.order)}; "
                              f"got {', '.join(given) or '(none)'}")
        if any(w < 0 for w in given.values()) or abs(sum(given.values()) - 1) > 1e-6:
            raise ConfigError(f"method.fixed_weights must be >= 0 and sum to 1; "
                              f"got {given} (sum {sum(given.values())})")
        return dict(given)

    # ------------------------------------------------------------------------------ training
    def alpha(self) -> float:
        if self.params.owm_alpha is not None:
            return self.params.owm_alpha
        ctx = self.step_context
        return 0.1 ** (ctx.batch_index / max(ctx.num_batches, 1) + 1)

    @torch.no_grad()
    def modify_head_grad(self, feats: torch.Tensor) -> None:
        """HGM before a modality's step; `feats` are that modality's batch features."""
        mode, grad = self.params.hgm, self.head.weight.grad
        r = feats.detach().float().mean(dim=0)
        if mode == "owm_paper":  # project with P of the previous steps, then add this step's mean
            grad.copy_(grad @ self.P.t())
            self.P.copy_(owm_paper_update(self.P, r, self.alpha()))
        elif mode in ("owm_code", "additive") and self.hgm_calls > 0:  # GSPlugin skips its first call
            self.P.copy_(owm_code_update(self.P, r, self.alpha()))
            grad.copy_(grad @ self.P.t() if mode == "owm_code" else grad + grad @ self.P.t())
        self.hgm_calls += 1

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)  # every encoder forward once, before any update
        losses = {}
        for m in self.order:
            with ctx.autocast():  # the head after the previous modality's step, the pre-update f_m
                loss = self.cross_entropy(self.head(feats[m]), batch.labels)
            ctx.backward(loss)
            if self.params.hgm != "off":
                self.modify_head_grad(feats[m])
            ctx.step()
            # torch < 2 zeroed grads in place: stepped encoders then get momentum/wd again later
            ctx.zero_grad(set_to_none=not self.params.legacy_zero_grad)
            losses[f"loss.{m}"] = loss.detach()
        if self.params.legacy_zero_grad:
            ctx.zero_grad(set_to_none=True)  # the code's `del p.grad` at the end of the batch
        return {"loss": torch.stack(list(losses.values())).mean(), **losses}

    # ---------------------------------------------------------------------------- evaluation
    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        logits = {m: self.head(feats[m]) for m in self.order}
        weights = fusion_weights(self.params.fusion_mode, logits, self.fixed)
        fused = sum(weights[m] * logits[m].float() for m in self.order)
        # the batch's mean weight per modality; the harness averages them over the split
        logs = {f"fusion_weight.{m}": w.detach().float().mean() for m, w in weights.items()}
        return Prediction(fused, logits, logs)

    def epoch_log(self) -> dict[str, float]:
        return {"p_fro": float(torch.linalg.matrix_norm(self.P))} if self.params.hgm != "off" else {}
