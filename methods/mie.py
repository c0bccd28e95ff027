"""MIE: stage-wise alternating training with sharpness-aware steps and a "flat" gradient projection.

Paper: Jiang, Chi, Yang, "Modal-aware Interactive Enhancement for Multimodal Learning", arXiv
2407.04587 (2024). The only released code is the authors' IGM repository (njustkmg/IJCAI25-IGM),
whose README cites MIE; it is the reference here (it may hold IGM-era changes).

What it does. Each modality has a private head Linear(d, 256) -> ReLU -> Linear(256, 64) ->
Linear(64, C) (no non-linearity between the last two; PyTorch default init, as the code applies no
weight_init). Training runs in stages of `epoch_list` epochs; stage k trains only modality
`order[k % M]` (its encoder and head are the only ones forwarded, so the others get no gradient).
At the start of every stage after the first: (1) the weights go back to the best epoch so far
(`restart_from_best`), (2) the previous modality's training inputs to each head Linear layer give
a projection P = V diag(exp(-T (s - s_min)/(s_max - s_min))) V^T (SVD of the accumulated
sum over batches of xbar^T xbar, xbar the batch mean of the layer input), (3) a fresh optimizer and
scheduler. During the stage each head Linear weight's gradient becomes grad_W @ P:
directions the previous modality used most are damped by up to e^-T, the least used kept.
The fused prediction is the mean of the heads' softmaxes; `Prediction.fused` holds its log
(argmax- and softmax-equivalent, so accuracy, macro-F1 and mAP are those of the mean softmax).

The per-step objective on the active modality, with mixup (lam ~ Beta(a, a), a permutation):
L = (1 - beta) [lam CE(o, y) + (1 - lam) CE(o, y_perm)] + beta CE(o, y)   (beta = flat_ratio).
`sam` picks how its gradient is taken:
- "paper" (default): real SAM on L. eps = rho g/||g|| with g = grad L at theta and one global norm
  over the active encoder and head; encoder and head re-run at theta + eps; the gradient there is
  applied at theta, which is restored exactly (parameters and BatchNorm statistics), after the
  projection. rho defaults to 0.05, the usual SAM value: the paper's rho is not known. Choice: the
  perturbed objective is the code's mixup + flat combination above, so that the two variants share
  one objective and differ only in the SAM mechanics; with mixup off it is plain CE, i.e. plain SAM.
- "code": L_ori = mixup CE at theta; each tensor moves by rho g/||g|| (per-tensor
  norm) and is never moved back; the head alone is re-applied to the SAME features (the encoder
  is not re-run), L = (1 - beta) L_ori + beta CE(o_flat, y) with un-mixed labels, and its gradient
  is stepped. rho defaults to 1e-10 (the A-V configs), which makes the perturbation nil: the
  objective is then 0.7 mixup-CE + 0.3 CE.
`mixup_alpha=0` turns mixup off (lam = 1, no permutation); lam and the permutation come from the
global torch RNG, so a resumed run draws the same ones. Per step it reports "loss" (L at theta),
"loss_ori" (the mixup term), "loss_flat" (the un-mixed CE term), "lam" and, for "paper",
"loss_sam" (L at theta + eps); per epoch the stage, the active modality and the epoch restored.

Differences from the released code, all deliberate:
- The code restarts each stage from the best checkpoint on the TEST split (macro-F1). This
  restarts from the best epoch on VALIDATION (`select_metric`, macro-F1 as the
  code by default); the test split never influences training.
- Only the head Linear layers get a P: the code also accumulates conv covariances it never uses
  (and runs SVDs on them). Layers are matched by position; one whose input size differs between the two
  modalities (the first, when the encoders' feature sizes differ) is left unprojected, as the
  code matches layers by weight shape.
- P comes from an unshuffled pass in chunks of `flat_batch_size` (default 12, the code's train
  batch; xbar is a batch mean, so the chunk size shapes P), without augmentation or mixup.
- The scheduler is re-created with the optimizer at each stage and stepped after each epoch
  (the code steps it before each epoch, one step early).
- Every epoch is selectable (as the code, which keeps the best over the whole run); epochs of the
  first stages fuse heads that have not trained yet and rarely win.
- SVDs run in float64 (the accumulated matrix is float32).
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from bench.config import Strict
from bench.errors import ConfigError, allowed_list
from bench.registry import METHODS
from methods.base import Batch, Method, MethodSetup, Prediction

DEFAULT_RHO = {"paper": 0.05, "code": 1e-10}
Positive = Annotated[int, Field(ge=1)]


class MIEParams(Strict):
    epoch_list: list[Positive] = Field(min_length=1)  # stage lengths; must sum to train.epochs
    modality_order: list[str] | None = None  # None: the dataset's modality order
    sam: Literal["paper", "code"] = "paper"
    rho: float | None = Field(None, ge=0)  # None: 0.05 (paper), 1e-10 (code)
    mixup_alpha: float = Field(1.0, ge=0)  # 0: no mixup
    flat_ratio: float = Field(0.3, ge=0, le=1)
    temperature: float = Field(0.4, ge=0)
    flat_batch_size: Positive = 12
    head_hidden: tuple[Positive, Positive] = (256, 64)
    restart_from_best: bool = True
    select_metric: Literal["macro_f1", "acc"] = "macro_f1"  # on validation, for the restarts


def flat_projection(acc: torch.Tensor, temperature: float) -> torch.Tensor:
    """P = V diag(exp(-T (s - s_min) / (s_max - s_min))) V^T from the SVD of `acc` (d x d)."""
    _, s, vh = torch.linalg.svd(acc.double())
    span = s.max() - s.min()
    if span <= 1e-7 * s.max():  # all directions equally used (float32 noise): nothing to damp
        return torch.eye(acc.shape[0], dtype=acc.dtype, device=acc.device)
    scale = torch.exp(-temperature * (s - s.min()) / span)
    return ((vh.T * scale) @ vh).to(acc.dtype)


def check_order(order: list[str] | None, names: tuple[str, ...]) -> tuple[str, ...]:
    if order is None:
        return names
    if sorted(order) != sorted(names):
        raise ConfigError(
            f"method.modality_order={order} must name each modality of this dataset exactly once; "
            f"allowed: {allowed_list(names)}"
        )
    return tuple(order)


@METHODS.register("mie")
class MIE(Method):
    Params = MIEParams

    def __init__(self, params: MIEParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.order = check_order(params.modality_order, tuple(m.name for m in setup.modalities))
        total = sum(params.epoch_list)
        if total != setup.epochs:
            raise ConfigError(
                f"method.epoch_list={params.epoch_list} sums to {total} epochs but train.epochs is "
                f"{setup.epochs}; set train.epochs={total} or change the stage lengths"
            )
        if len(params.epoch_list) < len(self.order):
            raise ConfigError(
                f"method.epoch_list has {len(params.epoch_list)} stages for {len(self.order)} "
                f"modalities ({', '.join(self.order)}); every modality needs a stage, or its untrained "
                "head would join the fused prediction"
            )
        self.starts = list(itertools.accumulate([0, *params.epoch_list[:-1]]))  # first epoch of each stage
        self.rho = DEFAULT_RHO[params.sam] if params.rho is None else params.rho
        h1, h2 = params.head_hidden
        # PyTorch's default Linear init: the reference code applies no weight_init to these heads
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.Linear(h2, setup.num_classes))
            for m, d in setup.feature_dims().items()
        })
        self.proj: dict[int, torch.Tensor] = {}  # head layer index -> P of the previous modality
        self.best: dict[str, Any] | None = None  # weights of the best validation epoch so far
        self.best_score, self.best_epoch = -math.inf, -1
        self.restored_from: int | None = None

    # ---- the schedule: everything follows from the epoch number, so a resumed run agrees
    def stage_of(self, epoch: int) -> int:
        return bisect.bisect_right(self.starts, epoch) - 1

    def modality_of(self, epoch: int) -> str:
        return self.order[self.stage_of(epoch) % len(self.order)]

    def on_epoch_start(self, epoch: int) -> None:
        stage = self.stage_of(epoch)
        self.restored_from = None
        if stage == 0 or epoch != self.starts[stage]:
            return
        if self.params.restart_from_best and self.best is not None:
            self.encoders.load_state_dict(self.best["encoders"])
            self.heads.load_state_dict(self.best["heads"])
            self.restored_from = self.best_epoch
        previous = self.order[(stage - 1) % len(self.order)]
        self.proj = {i: flat_projection(acc, self.params.temperature)
                     for i, acc in self.accumulate_inputs(previous).items()}
        self._h().reset_optimizer()

    def on_validation_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        score = metrics[self.params.select_metric]
        if self.params.restart_from_best and score > self.best_score:  # first maximum wins
            self.best_score, self.best_epoch = score, epoch
            self.best = {part: {k: v.detach().clone() for k, v in getattr(self, part).state_dict().items()}
                         for part in ("encoders", "heads")}

    def get_extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "proj": self.proj}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.best, self.best_score, self.best_epoch = state["best"], state["best_score"], state["best_epoch"]
        self.proj = dict(state["proj"])

    # ---- the flat projection
    @torch.no_grad()
    def accumulate_inputs(self, modality: str) -> dict[int, torch.Tensor]:
        """Sum over training chunks of xbar^T xbar for the input of each Linear layer of the head."""
        encoder, head = self.encoders[modality], self.heads[modality]
        sums: dict[int, torch.Tensor] = {}

        def hook(index: int):
            def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                xbar = args[0].float().mean(dim=0, keepdim=True)
                sums[index] = sums[index] + xbar.T @ xbar if index in sums else xbar.T @ xbar
            return accumulate

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(head) if isinstance(layer, nn.Linear)]
        was_training = self.training
        self.eval()
        try:
            for batch in self._h().train_batches():
                for chunk in batch.inputs[modality].split(self.params.flat_batch_size):
                    with self.autocast():
                        head(encoder(chunk))
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
        return sums

    def project_grads(self, head: nn.Sequential) -> None:
        for i, P in self.proj.items():
            grad = head[i].weight.grad
            if grad is None or grad.shape[1] != P.shape[0]:
                continue  # input sizes differ between the two modalities: no matching layer
            if P.device != grad.device:
                self.proj[i] = P = P.to(grad.device)
            grad.copy_(grad @ P.to(grad.dtype))

    # ---- one step
    def mixup(self, n: int) -> tuple[float, torch.Tensor | None]:
        a = self.params.mixup_alpha
        if a == 0:
            return 1.0, None
        lam = float(torch.distributions.Beta(torch.tensor(a), torch.tensor(a)).sample())
        return lam, torch.randperm(n)

    def mixup_ce(self, logits: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor | None) -> torch.Tensor:
        if perm is None:
            return self.cross_entropy(logits, y)
        return lam * self.cross_entropy(logits, y) + (1 - lam) * self.cross_entropy(logits, y[perm])

    def objective(self, m: str, x: torch.Tensor, y: torch.Tensor, lam: float,
                  perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta = self.params.flat_ratio
        with self.autocast():
            logits = self.heads[m](self.encoders[m](x))
            ori, flat = self.mixup_ce(logits, y, lam, perm), self.cross_entropy(logits, y)
        return (1 - beta) * ori + beta * flat, ori, flat

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        m = self.modality_of(self._h().epoch)
        x, y = batch.inputs[m], batch.labels
        lam, perm = self.mixup(len(y))
        if perm is not None and y.device.type == "cuda":
            # drawn on the CPU (the same permutation on any device); a pinned, non-blocking copy
            # keeps the host from waiting for the GPU's queue
            perm = perm.pin_memory().to(y.device, non_blocking=True)
            x = lam * x + (1 - lam) * x[perm]
        params = [p for p in (*self.encoders[m].parameters(), *self.heads[m].parameters()) if p.requires_grad]
        self.zero_grad_()
        out = (self.code_step if self.params.sam == "code" else self.paper_step)(m, x, y, lam, perm, params)
        self.project_grads(self.heads[m])
        self.optimizer_step()
        return {**out, "lam": lam}

    def code_step(self, m, x, y, lam, perm, params) -> dict[str, torch.Tensor]:
        beta = self.params.flat_ratio
        with self.autocast():
            f = self.encoders[m](x)
            loss_ori = self.mixup_ce(self.heads[m](f), y, lam, perm)
        grads = self._h().grad(loss_ori, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):  # as the code: per-tensor ascent, never undone
            if g is not None:
                p.data.add_(g / g.norm().clamp_min(1e-12), alpha=self.rho)
        with self.autocast():  # as the code: the head alone on the same features, un-mixed labels
            loss_flat = self.cross_entropy(self.heads[m](f), y)
            loss = (1 - beta) * loss_ori + beta * loss_flat
        self.backward(loss)
        return {"loss": loss.detach(), "loss_ori": loss_ori.detach(), "loss_flat": loss_flat.detach()}

    def paper_step(self, m, x, y, lam, perm, params) -> dict[str, torch.Tensor]:
        loss, loss_ori, loss_flat = self.objective(m, x, y, lam, perm)
        grads = self._h().grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        theta = [p.detach().clone() for p in params]
        buffers = [b for b in (*self.encoders[m].buffers(), *self.heads[m].buffers())]
        saved = [b.clone() for b in buffers]  # the second forward must not move BatchNorm statistics
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * (self.rho / (norm + 1e-12)))
        loss_sam, _, _ = self.objective(m, x, y, lam, perm)
        self.backward(loss_sam)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
            for b, s in zip(buffers, saved):
                b.copy_(s)
        return {"loss": loss.detach(), "loss_ori": loss_ori.detach(), "loss_flat": loss_flat.detach(),
                "loss_sam": loss_sam.detach()}

    # ---- the method's own view
    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        logits = {m: self.heads[m](feats[m]) for m in self.modality_names}
        probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits.values()]).mean(dim=0)
        return Prediction(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), logits)

    def epoch_log(self) -> dict[str, Any]:
        epoch = self._h().epoch
        return {"stage": self.stage_of(epoch), "modality": self.modality_of(epoch),
                "restored_from_epoch": self.restored_from}

    def selectable(self, epoch: int) -> bool:
        return True  # as the code, which keeps the best over the whole run
