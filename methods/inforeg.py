"""InfoReg: information acquisition regulation (Huang, Wei, Yang, Hu; CVPR 2025, arXiv 2503.18595).

Joint training plus each modality's unimodal cross-entropy, and, while the run is in its "prime
learning window" (the early epochs in which the information the model holds grows fast), a
proximal term that slows down the modality that leads on the batch: its encoder is pulled back
towards where it stood when the epoch began, the more strongly the larger its lead.
Released code: github.com/GeWu-Lab/InfoReg_CVPR2025, `main.py` as of commit 939b2ed (main.py last
changed in ea7b9d5; lines cited as R:<line>); its first release, commit 41d887f (V1:<line>).
BalanceBenchmark (GeWu-Lab/BalanceBenchmark @ 4c1482f) has no InfoReg trainer.

Per step (R:348-543):
1. features f_m = encoder_m(x_m); fused logits z; unimodal logits z_m from the fusion head's
   split (R:361-363: concat, that modality's block of the weights plus bias / M; sum and late
   fusion: that modality's head, bias / M for sum, as `Fusion.per_modality`).
2. L = CE(z, y) + sum_m CE(z_m, y) (R:378-380, 456-458: three backward passes accumulate into
   one gradient; here one backward of the sum). The code's first three backward passes per step
   (R:406-453) only log mean gradients and are zeroed before the update: left out. For late
   fusion CE(z, y) is the cross-entropy of the averaged logits (joint's late_loss=fused).
3. scores s_m = sum over the batch of softmax(z_m)[y] (R:460-461, OGM-GE's scores).
4. Inside the window (below), the leading modality l (the one whose score is strictly highest;
   none on a tie, R:465-485) gets beta_l = alpha_l * exp(tanh(s_l - s_r)), s_r the runner-up's
   score, and every parameter p of encoder l gets  grad += beta_l (p - p_0)  (R:489-495), p_0
   its value at the start of the epoch (R:259, `global_model = deepcopy(model)`): the gradient
   of (beta_l / 2) ||theta_l - theta_l,0||^2. The fusion head is never regulated. Two
   modalities: exactly the code's if/elif; M >= 3 (the code defines two; the suite's extension):
   the leader against the runner-up.
5. The information amount: for every Linear/Conv weight W of each encoder, F_W += grad(W)^2
   (after the regulation term, R:507-514); at the epoch's end trace_m = sum_W mean(F_W)
   (R:569-577: a mean per layer, not a sum) is appended to that modality's history (R:594-595).
6. The optimizer's step (R:543; SGD, momentum 0.9, weight decay 1e-4 in the code, R:714).

The window (R:237-243), decided at each epoch's start from the finished epochs' traces of the
modality `window_trace` (the code: audio's): with the history padded in front by N = 10 zeros
(R:693-694), tr1 = mean of its last N entries, tr2 = mean of the N before the last,
k = (tr1 - tr2) / tr1, k = 1 at epoch 0; the regulation is on while k > threshold (R:465, 473).
It is re-checked every epoch, so a window that closed opens again if the trace climbs.

Variants (`variant`), the two releases:
- "release" (default, R): unimodal logits from the fusion head's split, threshold 0.05,
  alpha {audio: 0.95, visual: 0.1} (R:468, 476: one coefficient per modality, hard-coded).
- "first_release" (V1): unimodal logits from a private linear head per modality (V1:139, the
  model's head_audio/head_video, trained by their cross-entropies and the modality's view at
  evaluation, V1:395), threshold 0.04 (V1:222, 227). Its `elif (score_v < score_a)` (V1:227)
  repeats the `if`'s condition, so the visual branch never runs: only audio is ever regulated,
  which alpha {audio: 0.95, visual: 0.0} reproduces.

Paper vs code: only the paper's abstract, the release's README and third-party summaries could be
read here (no PDF offline); they agree with the code (a Fisher-information trace, unimodal plus
multimodal losses, a coefficient growing with the performance gap), so no equation-level
difference is claimed and the code is the default. One difference is visible: the README's
Figure 1 shows the window on the whole network's information amount, while both releases decide
it from audio's (they compute the whole network's trace, R:501-505, 564-567, and never use it);
the whole-network source is not implemented (`window_trace` names one modality).

Departures from the code, and documented choices:
- Both releases raise a TypeError on their first step as published: the whole-model loop
  (R:501-505, V1:247-251) squares the gradient of every Linear, including the unused
  `fusion_module`'s (and at R, head_audio/head_video/head2/fc_x/fc_y), whose gradient is None.
  That sum is never used; the per-encoder traces that drive the window are computed as the code.
- Parameters are selected by module membership (`encoders[m]`), not by name ('audio_net' in
  name, R:491, 509). Linear and Conv1d/2d/3d weights count for the trace (the code's backbones
  have only Conv2d and Linear, R:509).
- k when tr1 = 0 (no trace yet, or an encoder without gradients): the code divides by zero (a
  ZeroDivisionError); here the window is closed (k = 0).
- Modalities are named by the dataset: `alpha` gives one coefficient per modality (or one number
  for all), and a dataset without the default's names must set it; `window_trace: all` (not in
  the code) reads the window from the sum of every encoder's trace, for data whose dominant
  modality is not known in advance (the starter's own-data sweeps use it with alpha 0.95).
- `unimodal_loss: false` (not in the code) drops the unimodal cross-entropies; with it and no
  regulation (alpha 0, or outside the window) the method is the suite's joint training.

Each step reports `loss` (the total), `loss_fused`, `loss_unimodal.<m>` (with the unimodal
loss), `score.<m>`, `beta.<m>` (0 outside the window) and `regulated` (1 inside the window).
Each epoch logs `acquisition_rate` (k), `window` (1 if open) and `trace.<m>` (the epoch's
information amount). Cost per step: one forward and one backward as joint training; the
regulation and the squared gradients are element-wise passes over the encoders' parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.methods.ogm_ge import ground_truth_scores
from mmbalance.models.fusion import ConcatFusion, LateFusion, SumFusion, build_fusion, linear

# per variant: (the window's threshold on k, alpha per modality, where the unimodal logits come from)
VARIANT_DEFAULTS: dict[str, tuple[float, dict[str, float], str]] = {
    "release": (0.05, {"audio": 0.95, "visual": 0.1}, "split"),  # R:465-476
    "first_release": (0.04, {"audio": 0.95, "visual": 0.0}, "heads"),  # V1:222-230, visual unreachable
}
INFORMATION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class InfoRegParams(Strict):
    variant: Literal["release", "first_release"] = "release"
    # None: the variant's; one number applies to every modality (a tuned alpha is one number). Search ranges
    # around the releases' values (alpha 0.95 / 0.1, threshold 0.05 / 0.04; no other published)
    alpha: float | dict[str, float] | None = tunable(None, 0.05, 2.0, log=True)
    window_threshold: float | None = tunable(None, 0.01, 0.2, log=True)  # None: the variant's (0.05 / 0.04)
    window_epochs: int = Field(10, ge=1)  # N of the moving averages (R:240-241)
    # the modality whose trace decides the window (R:240: audio's), or "all": the sum of every
    # encoder's trace (not in the code; for data whose dominant modality is not known)
    window_trace: str = "audio"
    unimodal_loss: bool = True  # False: not in the code (the regulation on joint training)

    @model_validator(mode="after")
    def _consistent(self) -> InfoRegParams:
        values = self.alpha.values() if isinstance(self.alpha, dict) else [self.alpha]
        if any(a is not None and a < 0 for a in values):
            raise ValueError(f"alpha={self.alpha!r}: the regulation coefficients must be >= 0")
        if self.variant == "first_release" and not self.unimodal_loss:
            raise ValueError("variant='first_release' reads the unimodal heads, which only the unimodal loss "
                             "trains; remove unimodal_loss=false or set method.variant=release")
        return self

    def threshold(self) -> float:
        return VARIANT_DEFAULTS[self.variant][0] if self.window_threshold is None else self.window_threshold

    def coefficients(self, modalities: Sequence[str]) -> dict[str, float]:
        """alpha per modality, checked against the dataset's modalities."""
        alpha = VARIANT_DEFAULTS[self.variant][1] if self.alpha is None else self.alpha
        if not isinstance(alpha, dict):
            return dict.fromkeys(modalities, float(alpha))
        missing, unknown = set(modalities) - set(alpha), set(alpha) - set(modalities)
        if missing or unknown:
            source = "method.alpha" if self.alpha is not None else f"the {self.variant!r} variant's alpha"
            raise ConfigError(
                f"method inforeg: {source} {alpha} must name each of the dataset's modalities "
                f"({', '.join(modalities)}) once; missing {sorted(missing)}, unknown {sorted(unknown)}. "
                "Set method.alpha={<modality>: <coefficient>, ...} or one number for all")
        return {m: float(alpha[m]) for m in modalities}


# ------------------------------------------------------------------------- the math (pure)


def acquisition_rate(traces: Sequence[float], window: int) -> float:
    """k = (tr1 - tr2) / tr1 over the history padded in front with `window` zeros (R:237-243);
    1 before any epoch finished; 0 (closed) when tr1 = 0, where the code divides by zero."""
    if not traces:
        return 1.0
    padded = [0.0] * window + list(traces)
    tr1 = sum(padded[-window:]) / window
    tr2 = sum(padded[-window - 1:-1]) / window
    return (tr1 - tr2) / tr1 if tr1 != 0 else 0.0


def regulation_coefficients(scores: dict[str, torch.Tensor], alpha: dict[str, float]) -> dict[str, torch.Tensor]:
    """beta_m = alpha_m exp(tanh(s_m - s_runner-up)) for the modality whose score is strictly the
    highest, 0 for every other (0-d tensors: the step never waits for the device)."""
    betas = {}
    for m, s in scores.items():
        runner_up = torch.stack([scores[o] for o in scores if o != m]).max()
        betas[m] = torch.where(s > runner_up, alpha[m] * torch.exp(torch.tanh(s - runner_up)), torch.zeros_like(s))
    return betas


@torch.no_grad()
def regulate_(params: Sequence[nn.Parameter], anchors: Sequence[torch.Tensor], beta: torch.Tensor) -> None:
    """grad += beta (p - p_0) for every parameter (R:492, 495): the proximal term's gradient."""
    for p, p0 in zip(params, anchors, strict=True):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad += beta * (p - p0)


def information_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weights whose squared gradients make the information amount (R:507-514)."""
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, INFORMATION_LAYERS) and mod.weight.requires_grad]


def fisher_trace(accumulated: Sequence[torch.Tensor]) -> float:
    """sum over layers of the mean of the accumulated squared gradients (R:569-572)."""
    return float(sum(f.mean().item() for f in accumulated))


# ------------------------------------------------------------------------------- the method


@METHODS.register("inforeg")
class InfoReg(Method):
    family = "optimisation"  # it acts on the update: the leader's gradient is pulled back (not in BalanceBenchmark)
    Params = InfoRegParams

    def __init__(self, params: InfoRegParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method inforeg regulates one modality against the others; the dataset has "
                              f"{len(names)} ({', '.join(names)}): use method.name=unimodal or joint")
        self.alpha = params.coefficients(names)
        if params.window_trace not in (*names, "all"):
            raise ConfigError(f"method.window_trace={params.window_trace!r} is not a modality of this dataset "
                              f"({', '.join(names)}); set it to the modality whose information amount "
                              "decides the window (the code: the dominant audio), or 'all' (every encoder's)")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        self.split = VARIANT_DEFAULTS[params.variant][2] == "split"
        if self.split and not isinstance(self.fusion, (ConcatFusion, SumFusion, LateFusion)):
            raise ConfigError(f"method inforeg (variant {params.variant!r}) reads each modality's logits from the "
                              f"fusion head's split, which model.fusion={setup.fusion!r} has not; use concat, sum "
                              "or late, or method.variant=first_release (private unimodal heads)")
        # first_release: private heads, built after the fusion so that encoders and fusion start as joint's
        self.unimodal_heads = None if self.split else nn.ModuleDict(
            {m: linear(d, setup.num_classes) for m, d in setup.feature_dims().items()})
        traced = names if params.window_trace == "all" else (params.window_trace,)
        if not any(information_weights(self.encoders[m]) for m in traced):
            raise ConfigError(f"method.window_trace={params.window_trace!r}: its encoder has no trainable Linear or "
                              "Conv weight, so its information amount is always 0; choose another modality")
        # host-side state saved through get_extra_state: the finished epochs' traces and the window
        self.traces: dict[str, list[float]] = {m: [] for m in names}
        self.rate = 1.0
        # per epoch, rebuilt by on_epoch_start (checkpoints fall between epochs; the harness may
        # have moved the parameters since construction)
        self.anchors: dict[str, list[torch.Tensor]] | None = None
        self.weights: dict[str, list[nn.Parameter]] = {}
        self.fisher: dict[str, list[torch.Tensor]] = {}

    def get_extra_state(self) -> dict[str, Any]:
        return {"traces": self.traces, "rate": self.rate}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.traces = {m: [float(t) for t in ts] for m, ts in state["traces"].items()}
        self.rate = float(state["rate"])

    def regulated_params(self, m: str) -> list[nn.Parameter]:
        return [p for p in self.encoders[m].parameters() if p.requires_grad]

    # ---- the epoch: the window, the anchors, the information amount
    def window_history(self) -> list[float]:
        """The finished epochs' traces that decide the window."""
        if self.params.window_trace == "all":
            return [sum(epoch) for epoch in zip(*self.traces.values())]
        return self.traces[self.params.window_trace]

    def on_epoch_start(self, epoch: int) -> None:
        self.rate = acquisition_rate(self.window_history(), self.params.window_epochs)
        self.anchors = {m: [p.detach().clone() for p in self.regulated_params(m)] for m in self.modality_names}
        self.weights = {m: information_weights(self.encoders[m]) for m in self.modality_names}
        self.fisher = {m: [torch.zeros_like(w) for w in ws] for m, ws in self.weights.items()}

    def on_epoch_end(self, epoch: int) -> None:
        for m in self.modality_names:
            self.traces[m].append(fisher_trace(self.fisher[m]))

    def in_window(self) -> bool:
        return self.rate > self.params.threshold()

    def epoch_log(self) -> dict[str, Any]:
        return {"acquisition_rate": self.rate, "window": float(self.in_window()),
                **{f"trace.{m}": ts[-1] for m, ts in self.traces.items() if ts}}

    # ---- the step
    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.unimodal_heads is None:
            return self.fusion.per_modality(feats)
        return {m: self.unimodal_heads[m](feats[m]) for m in self.modality_names}

    @torch.no_grad()
    def accumulate_information(self) -> None:
        for m, ws in self.weights.items():
            for f, w in zip(self.fisher[m], ws, strict=True):
                if w.grad is not None:
                    f += w.grad * w.grad

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.anchors is None:
            raise RuntimeError("InfoReg.training_step before on_epoch_start: the harness calls it at every epoch's "
                               "start to take the parameters the regulation pulls towards (a test must do the same)")
        ctx, labels = self.step_context, batch.labels
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            fused = self.cross_entropy(self.fusion(feats), labels)
            uni = self.unimodal_logits(feats)
            uni_losses = {m: self.cross_entropy(z, labels) for m, z in uni.items()} if self.params.unimodal_loss else {}
        loss = fused + sum(uni_losses.values()) if uni_losses else fused
        ctx.backward(loss)
        with torch.no_grad():
            scores = {m: ground_truth_scores(z.detach(), labels) for m, z in uni.items()}
            betas = regulation_coefficients(scores, self.alpha)
        active = self.in_window()
        if active:
            for m in self.modality_names:
                regulate_(self.regulated_params(m), self.anchors[m], betas[m])
        self.accumulate_information()
        ctx.step()
        out = {"loss": loss.detach()}
        if uni_losses:
            out["loss_fused"] = fused.detach()
            out.update({f"loss_unimodal.{m}": v.detach() for m, v in uni_losses.items()})
        out.update({f"score.{m}": s for m, s in scores.items()})
        out.update({f"beta.{m}": b if active else torch.zeros_like(b) for m, b in betas.items()})
        out["regulated"] = torch.tensor(float(active))
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.unimodal_logits(feats))
