"""MIE: stage-wise alternating training with sharpness-aware steps and a "flat" gradient projection.

Paper: Jiang, Chi, Yang, "Modal-aware Interactive Enhancement for Multimodal Learning", arXiv
2407.04587 (2024). The only released code is the authors' IGM repository (njustkmg/IJCAI25-IGM),
whose README cites MIE; it is the reference here (it may hold IGM-era changes).

What it does. Each modality has a private head Linear(d, 256) -> ReLU -> Linear(256, 64) ->
Linear(64, C) (no non-linearity between the last two; PyTorch default init, as the code applies no
weight_init). Training runs in stages of `epoch_list` epochs; stage k trains only modality
`order[k % M]` (its encoder and head are the only ones forwarded, so the others get no gradient).
At the start of every stage after the first: (1) the weights go back to the best epoch so far
(`restart_from_best`), (2) the previous modality's training inputs to each of its Linear layers
that `project_layers` considers give a projection P = V diag(exp(-T (s - s_min)/(s_max - s_min))) V^T
(SVD of the accumulated sum over batches of xbar^T xbar, xbar the batch mean of the layer input),
(3) a fresh optimizer and scheduler. During the stage, after the backward and before the
optimizer step, a Linear weight's gradient of the active modality becomes grad_W @ P: directions
the previous modality used most are damped by up to e^-T, the least used kept. Which layers:
- `project_layers: head`: each head Linear layer with the P of the previous head's layer at the
  same position, if the two weights have the same shape (the first layer's do not when the
  encoders' feature sizes differ: it is left unprojected). This is the paper's description, a
  modification of the classifier.
- `project_layers: shape_match`, the released code's rule: every Linear layer of the active
  encoder and head is multiplied by the P of EVERY Linear layer of the previous encoder and head
  whose weight has the same shape, one after another in that modality's module order (encoder
  before head, registration order): grad_W @ P_1 @ P_2 ... when several share the shape. Encoder
  Linear layers are then accumulated too.
The default follows `sam`: head for "paper", shape_match for "code", so that `sam: code` alone is
the released code's step. The two agree when no encoder Linear layer shares its weight shape
with a layer of the other modality (the code's ResNet18s have no Linear layer) and the head's three
weight shapes differ from each other; they differ for encoders with Linear layers of equal shapes
(the suite's `mlp` or `small_cnn` encoders of equal widths, transformers).
The fused prediction is the mean of the heads' softmaxes; `Prediction.fused` holds its log
(argmax- and softmax-equivalent, so accuracy, macro-F1 and mAP are those of the mean softmax).

The per-step objective on the active modality, with mixup (lam ~ Beta(a, a), a permutation; the
encoder gets x_mix = lam x + (1 - lam) x[perm], on every device):
L = (1 - beta) [lam CE(o, y) + (1 - lam) CE(o, y_perm)] + beta CE(o, y)   (beta = flat_ratio).
`sam` picks how its gradient is taken:
- "paper" (default): real SAM on L. eps = rho g/||g|| with g = grad L at theta and one global norm
  over the active encoder and head; encoder and head re-run at theta + eps; the gradient there is
  applied at theta, which is restored exactly (parameters and BatchNorm statistics), after the
  projection. rho defaults to 0.05, the usual SAM value: the paper's rho is not known. Choice: the
  perturbed objective is the code's mixup + flat combination above, so that the two variants share
  one objective and differ only in the SAM mechanics; with mixup off it is plain CE, i.e. plain SAM.
- "code", the released step: f = encoder(x_mix) and L_ori = mixup CE of head(f), both at theta;
  each tensor p of the active encoder and head is then REBOUND (`p.data = p.data + eps_p`, as the
  code, not moved in place) by eps_p = rho g_p/||g_p|| (g = grad L_ori, per-tensor norm) and never
  moved back; the head alone is re-applied to the SAME features f (the encoder is not re-run),
  L_flat = CE(head_{theta+eps}(f), y) with un-mixed labels, L = (1 - beta) L_ori + beta L_flat,
  and one backward of L is stepped from theta + eps. What that backward computes: L_flat's part
  is the gradient at the head's theta + eps, through the encoder's graph at theta. L_ori's part
  runs through the graph its forward saved: its activations (f included) hold theta, and so does
  every weight saved as a view or copy of the parameter (a Linear's W^T; any weight cast under
  autocast), which the rebinding leaves on the old storage; a weight saved as the parameter
  itself (a convolution's or BatchNorm's, in float32) reads theta + eps. Through Linear layers
  and ReLUs only (the code's heads; MLP encoders) L_ori's part is thus exactly its gradient at
  theta; through the code's ResNet18s the conv and BatchNorm weights read theta + eps. A move in
  place would let every saved weight read theta + eps (at rho = 1e-2 the gradients differ by
  ~1e-3). rho defaults to 1e-10 (the A-V configs), which makes the perturbation nil: the
  objective is then 0.7 mixup-CE + 0.3 CE.
`mixup_alpha=0` turns mixup off (lam = 1, no permutation), and must for token-id inputs (a `text`
modality: mixing ids means nothing; refused with a clear error); lam and the permutation come from the
global torch RNG, so a resumed run draws the same ones. Per step it reports "loss" (L: for "paper"
at theta, for "code" with L_flat at the head's theta + eps), "loss_ori" (the mixup term),
"loss_flat" (the un-mixed CE term), "lam" and, for "paper", "loss_sam" (L at theta + eps); per
epoch the stage, the active modality and the epoch restored.

Differences from the released code, all deliberate:
- The code restarts each stage from the best checkpoint on the TEST split (macro-F1). This
  restarts from the best epoch on VALIDATION (`select_metric`, macro-F1 as the
  code by default); the test split never influences training.
- Only Linear layers get a P: the code also accumulates conv covariances it never uses
  (and runs SVDs on them). A Linear input with positions, (B, ..., d), gives one xbar row per
  position (the code's Linear hook accepts only (B, d); its conv hook does the same per position).
- P comes from an unshuffled pass in chunks of `flat_batch_size` (default 12, the code's train
  batch; xbar is a batch mean, so the chunk size shapes P), without augmentation or mixup.
- lam is drawn with torch's Beta (the code: numpy's), so a seed gives other draws of the same law.
- One rho for encoder and head (the code has `noise_ratio` and `noise_ratio_cls`, equal in every
  config); a gradient tensor of zero norm is not moved (the code divides by zero: NaN weights).
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

from mmbalance.core.errors import ConfigError, allowed_list
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup

DEFAULT_RHO = {"paper": 0.05, "code": 1e-10}
DEFAULT_PROJECT_LAYERS = {"paper": "head", "code": "shape_match"}
Positive = Annotated[int, Field(ge=1)]


class MIEParams(Strict):
    epoch_list: list[Positive] = Field(min_length=1)  # stage lengths; must sum to train.epochs
    modality_order: list[str] | None = None  # None: the dataset's modality order
    sam: Literal["paper", "code"] = "paper"
    rho: float | None = tunable(None, 1e-4, 0.5, log=True, ge=0)  # None: 0.05 (paper), 1e-10 (code)
    project_layers: Literal["head", "shape_match"] | None = None  # None: head (paper), shape_match (code)
    mixup_alpha: float = Field(1.0, ge=0)  # 0: no mixup
    flat_ratio: float = tunable(0.3, 0.05, 0.9, ge=0, le=1)
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
    family = "optimisation"
    Params = MIEParams

    def __init__(self, params: MIEParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.order = check_order(params.modality_order, tuple(m.name for m in setup.modalities))
        tokens = [m.name for m in setup.modalities if m.kind == "text"]
        if params.mixup_alpha > 0 and tokens:
            raise ConfigError(
                f"method.mixup_alpha={params.mixup_alpha} mixes each modality's inputs (lam x + (1 - lam) x'), "
                f"which token ids ({', '.join(tokens)}: text) cannot be; set method.mixup_alpha=0 (no mixup)"
            )
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
        self.project_layers = params.project_layers or DEFAULT_PROJECT_LAYERS[params.sam]
        h1, h2 = params.head_hidden
        # PyTorch's default Linear init: the reference code applies no weight_init to these heads
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.Linear(h2, setup.num_classes))
            for m, d in setup.feature_dims().items()
        })
        # layer name -> the previous modality's P's its weight gradient is multiplied by
        self.proj: dict[str, list[torch.Tensor]] = {}
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
        self.proj = self.projections(self.modality_of(epoch), previous)
        self.step_context.reset_optimizer()

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
        self.proj = {name: list(Ps) for name, Ps in state["proj"].items()}

    # ---- the flat projection
    def linear_layers(self, modality: str) -> list[tuple[str, nn.Linear]]:
        """The Linear layers the projection considers, named "head.<i>" / "encoder.<name>", in the
        code's order (encoder before head, module registration order within each)."""
        parts = {"head": self.heads[modality]}
        if self.project_layers == "shape_match":
            parts = {"encoder": self.encoders[modality], **parts}
        return [(f"{part}.{name}", layer) for part, module in parts.items()
                for name, layer in module.named_modules() if isinstance(layer, nn.Linear)]

    @torch.no_grad()
    def accumulate_inputs(self, modality: str) -> dict[str, torch.Tensor]:
        """Sum over training chunks of xbar^T xbar for the input of each considered Linear layer
        (xbar: the chunk mean; an input with positions, (B, ..., d), gives one row per position)."""
        encoder, head = self.encoders[modality], self.heads[modality]
        sums: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def accumulate(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                x = args[0].float()
                xbar = x.mean(dim=0).reshape(-1, x.shape[-1])
                sums[name] = sums[name] + xbar.T @ xbar if name in sums else xbar.T @ xbar
            return accumulate

        handles = [layer.register_forward_hook(hook(name)) for name, layer in self.linear_layers(modality)]
        ctx, was_training = self.step_context, self.training
        self.eval()
        try:
            for batch in ctx.train_batches():
                for chunk in batch.inputs[modality].split(self.params.flat_batch_size):
                    with ctx.autocast():
                        head(encoder(chunk))
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
        return sums

    def projections(self, active: str, previous: str) -> dict[str, list[torch.Tensor]]:
        """For each Linear layer of `active`, the P's its weight gradient is multiplied by, in order."""
        P = {name: flat_projection(acc, self.params.temperature)
             for name, acc in self.accumulate_inputs(previous).items()}
        before = [(name, layer.weight.shape) for name, layer in self.linear_layers(previous) if name in P]
        out: dict[str, list[torch.Tensor]] = {}
        for name, layer in self.linear_layers(active):
            if self.project_layers == "head":  # its counterpart in the previous head, if shaped alike
                matches = [n for n, shape in before if n == name and shape == layer.weight.shape]
            else:  # as the code: every previous layer of the same weight shape, one after another
                matches = [n for n, shape in before if shape == layer.weight.shape]
            if matches:
                out[name] = [P[n] for n in matches]
        return out

    def project_grads(self, modality: str) -> None:
        layers = dict(self.linear_layers(modality))
        for name, Ps in self.proj.items():
            grad = layers[name].weight.grad
            if grad is None:
                continue
            for i, P in enumerate(Ps):
                if P.device != grad.device:
                    Ps[i] = P = P.to(grad.device)
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
        with self.step_context.autocast():
            logits = self.heads[m](self.encoders[m](x))
            ori, flat = self.mixup_ce(logits, y, lam, perm), self.cross_entropy(logits, y)
        return (1 - beta) * ori + beta * flat, ori, flat

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        m = self.modality_of(ctx.epoch)
        x, y = batch.inputs[m], batch.labels
        lam, perm = self.mixup(len(y))
        if perm is not None:
            if y.device.type == "cuda":
                # drawn on the CPU (the same permutation on any device); a pinned, non-blocking copy
                # keeps the host from waiting for the GPU's queue
                perm = perm.pin_memory().to(y.device, non_blocking=True)
            x = lam * x + (1 - lam) * x[perm]
        params = [p for p in (*self.encoders[m].parameters(), *self.heads[m].parameters()) if p.requires_grad]
        ctx.zero_grad()
        out = (self.code_step if self.params.sam == "code" else self.paper_step)(m, x, y, lam, perm, params)
        self.project_grads(m)
        ctx.step()
        return {**out, "lam": lam}

    def code_step(self, m, x, y, lam, perm, params) -> dict[str, torch.Tensor]:
        beta, ctx = self.params.flat_ratio, self.step_context
        with ctx.autocast():
            f = self.encoders[m](x)
            loss_ori = self.mixup_ce(self.heads[m](f), y, lam, perm)
        grads = ctx.grad(loss_ori, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):  # as the code: per-tensor ascent, never undone
            if g is not None:
                # rebound, not added in place, as the code: what the forward saved through a view
                # or a copy of p (Linear's W^T) keeps theta for the backward of loss_ori
                p.data = p.data + self.rho * (g / g.norm().clamp_min(1e-12))
        with ctx.autocast():  # as the code: the head alone on the same features, un-mixed labels
            loss_flat = self.cross_entropy(self.heads[m](f), y)
            loss = (1 - beta) * loss_ori + beta * loss_flat
        ctx.backward(loss)
        return {"loss": loss.detach(), "loss_ori": loss_ori.detach(), "loss_flat": loss_flat.detach()}

    def paper_step(self, m, x, y, lam, perm, params) -> dict[str, torch.Tensor]:
        loss, loss_ori, loss_flat = self.objective(m, x, y, lam, perm)
        grads = self.step_context.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        theta = [p.detach().clone() for p in params]
        buffers = [*self.encoders[m].buffers(), *self.heads[m].buffers()]
        saved = [b.clone() for b in buffers]  # the second forward must not move BatchNorm statistics
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * (self.rho / (norm + 1e-12)))
        loss_sam, _, _ = self.objective(m, x, y, lam, perm)
        self.step_context.backward(loss_sam)
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
        epoch = self.step_context.epoch
        return {"stage": self.stage_of(epoch), "modality": self.modality_of(epoch),
                "restored_from_epoch": self.restored_from}

    def selectable(self, epoch: int) -> bool:
        return True  # as the code, which keeps the best over the whole run
