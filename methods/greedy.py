"""Greedy: balanced multi-modal learning (Wu, Jastrzebski, Cho & Geras, ICML 2022, "Characterizing
and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural Networks").

The model is two encoders joined inside, not only at the end: after each of the encoders' last
`mmtm_stages` blocks an MMTM (multimodal transfer module, Joze et al. 2020) rescales both
modalities' maps by channel gates computed from both. Per MMTM, with s_m the per-sample channel
means of modality m's map h_m (over space, and over frames for video):

    e = ReLU(W_sq [s_0; s_1] + b_sq),  g_m = sigmoid(W_m e + b_m),  h_m <- h_m * g_m,

W_sq of width int(2 (C_0 + C_1) / ratio). The pooled branch features go to the run's fusion
head, and the loss is joint training's for that head (late fusion: the sum of the branches'
cross-entropies, the release's `blend_loss` over its per-branch heads, fused = their mean; any
other head: the cross-entropy of the fused logits, BalanceBenchmark's concat).

Re-balancing (`rebalance=guided`, the release's `Bias_Mitigation_Strong`). After every backward
that is not a re-balancing step, before the optimizer's step, the conditional learning speeds:

    r_bypass(m) = sum |grad|^2 / sum |w|^2 over m's MMTM parameters (its gate W_m, b_m and the
                  shared squeeze W_sq, b_sq of every MMTM), r_main(m) the same over m's branch
                  (its encoder and its own fusion head, where the head has one per modality);
    M_bypass(m) += r_bypass(m), M_main(m) += r_main(m)   (sums over all such steps since the start)
    BDR_m = log10(M_bypass(m) / M_main(m)),  d = BDR_0 - BDR_1.

From epoch `warmup_epochs` on, |d| > epsilon starts `window` re-balancing steps (the next ones)
that care for modality c = 0 if d > 0 else 1 (the dataset's first and second modality): in
them c's gates are replaced by their running average over all training steps so far (detached,
the same for every sample), so c's branch gets nothing of the other modality through the MMTMs
and must learn from its own input; the other branch is gated as usual, and all parameters step.
The decision is taken on this step's gradients and acts from the next step on.
`rebalance=random` is the release's `Bias_Mitigation_Random` ablation: after the warm-up every
step draws uniformly one of {plain, caring for 1, caring for 0} for the next (from the global
torch RNG, which the harness checkpoints; the release draws from Python's `random`).
`rebalance=off` trains the MMTM model jointly (the paper's plain MMTM baseline); with it and
`mmtm_stages=0` the method is joint training exactly.

Sources: nyukat/greedy_multimodal_learning @ a190e03 (src/model.py L58-108: MMTM after layer2-4;
src/balanced_mmtm.py L16-154: MMTM_mitigate; src/callbacks.py L173-302: Bias_Mitigation_Strong and
_Random; train.py L22-28 blend_loss; configs/training_guided.gin: epsilon 0.01, window 5,
starting_epoch 2 (1-based), SGD lr 0.1 without momentum, batch 8). BalanceBenchmark @ 4c1482f
(balancemm/trainer/Greedy_trainer.py L19-180; balancemm/models/avclassify_model.py L387-624,
BaseClassifierGreedyModel and MMTM; configs/trainer_config.yaml L56-61: alpha 0.001, window 5).

`variant` sets the defaults that differ between the two releases (a key given in the config wins):
- release (default): MMTMs after the last 3 blocks (ResNet18's layer2-4), re-balancing from the
  second epoch (warmup_epochs 1), epsilon 0.01, and the release's running averages: its
  balanced_mmtm.py L114 averages the FIRST modality's gates into the second modality's average
  too (`running_avg_weight_skeleton = (vis_out.mean(0) + ...)`), so a re-balancing step caring for
  the second modality gates it with the first's average gates (`running_average=release`; it needs
  equal widths, as the release's does).
- balancebenchmark: MMTMs after the last 4 blocks (layer1-4), from the first step (warmup 0),
  epsilon ("alpha") 0.001, each modality's own average (`running_average=own`). Its loss is the
  fused cross-entropy of a concat head (its recipes set model.fusion=concat). Its HEAD commit
  empties the averages at every MMTM forward (avclassify_model.py L568) and then raises KeyError
  reading them (L594); the code before that line was added (3f27575, L576-653) is what is
  transcribed here. Its visual maps are regrouped with a hard-coded batch of 64 (L574); here by
  the encoder's own frame count.

Departures from both releases, all of bookkeeping:
- The running averages of the gates are taken over training steps only; the releases also fold in
  every evaluation forward (and lose them on a restart: they are plain attributes). Here they are
  buffers, and with the speed sums and the re-balancing state they survive a resume.
- A parameter whose gradient is None counts as a zero gradient in the speeds (the release reads
  `.grad.data`; under torch >= 2 zero_grad leaves None only on parameters no loss reached).
- MMTM blocks sit after the encoders' last `mmtm_stages` blocks, counted from the end of each;
  an encoder with fewer blocks gets one after each of them (the MLP and small CNN have 2).

Diagnostics. Each step reports `loss`, `speed` (d, the last one computed, as the release logs
`d_BDR`), `bdr.<m>`, and `rebalance.<m>` (1 in a step that cares for m), averaged over the epoch
by the harness: the share of re-balancing steps per modality. At evaluation, `predict` also
runs each branch with the cross-modal flow cut (the release's `turnoff_cross_modal_flow` in
eval.gin: the other modality's squeeze replaced by its average, here over the last epoch's
training steps, where the release records it over the training split with the final model) and
logs `acc_mmtm.<m>` and `acc_bypass.<m>`, the accuracies of m's own logits with and without the
other modality; the paper's conditional utilisation rate of the other modality given m is
u = (acc_mmtm.<m> - acc_bypass.<m>) / acc_mmtm.<m> (`utilisation_rates`), and d_util = u(1|0) -
u(0|1). The frozen features the probes read (`features`) are these cut branches: each a function
of its own modality alone.

Cost: one forward and one backward per step, as joint training, plus the MMTMs (small linear
layers) and, per step, one pass over the parameters for the speeds; evaluation runs the branches
twice (with and without the cross-modal flow).

Two modalities only: MMTM and the speed gap d are pairwise in both releases; M >= 3 is refused.
The encoders must expose their stages (models/stages.py: resnet18, small_cnn, mlp) unless
mmtm_stages=0.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, PositiveFloat, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion
from mmbalance.models.stages import stages_of

VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "release": {"mmtm_stages": 3, "warmup_epochs": 1, "epsilon": 0.01, "running_average": "release"},
    "balancebenchmark": {"mmtm_stages": 4, "warmup_epochs": 0, "epsilon": 0.001, "running_average": "own"},
}


class GreedyParams(Strict):
    variant: Literal["release", "balancebenchmark"] = "release"
    rebalance: Literal["guided", "random", "off"] = "guided"
    # MMTMs after each of the encoders' last `mmtm_stages` blocks; 0: none (then joint training)
    mmtm_stages: int = Field(3, ge=0)
    ratio: PositiveFloat = 4.0  # MMTM's squeeze width is int(2 (C_0 + C_1) / ratio)
    # the re-balancing rule's two coefficients; ranges around both releases' values (epsilon 0.01 / 0.001,
    # window 5 in each)
    epsilon: PositiveFloat = tunable(0.01, 1e-4, 0.1, log=True)  # |d| above it starts re-balancing
    window: int = tunable(5, 1, 20, log=True, ge=1)  # re-balancing steps per start (curation_windowsize)
    warmup_epochs: int = Field(1, ge=0)  # epochs before re-balancing may start
    running_average: Literal["release", "own"] = "release"

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {**VARIANT_DEFAULTS.get(data.get("variant", "release"), {}), **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GreedyParams:
        if self.mmtm_stages == 0 and self.rebalance != "off":
            raise ValueError(f"rebalance={self.rebalance!r} needs MMTM blocks (mmtm_stages >= 1): its steps replace "
                             "the MMTM gates; set method.rebalance=off for joint training, or mmtm_stages >= 1")
        return self


# ------------------------------------------------------------------------------- pure functions


def squeeze(h: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-sample channel means of an (N, C, ...) map; N = B * frames for video (frames > 0)."""
    s = h.reshape(h.shape[0], h.shape[1], -1).mean(dim=-1)
    return s if frames == 0 else s.view(-1, frames, s.shape[1]).mean(dim=1)


def excite(h: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    """h * gate, the (B, C) gate broadcast over each sample's frames and positions."""
    if frames:
        gate = gate.repeat_interleave(frames, dim=0)
    return h * gate.view(gate.shape + (1,) * (h.dim() - 2))


def running_mean(average: torch.Tensor, batch_mean: torch.Tensor, count: int) -> torch.Tensor:
    """The mean of `count` earlier values and one more, as the release writes it."""
    return (batch_mean + average * count).detach() / (count + 1)


def grad_weight_ratio(params: list[nn.Parameter]) -> torch.Tensor:
    """sum |grad|^2 / sum |w|^2 over `params` (float64; a None gradient counts as zero)."""
    weights = torch.stack([(p.detach() ** 2).sum() for p in params]).double().sum()
    grads = torch.stack([(p.grad ** 2).sum() if p.grad is not None else torch.zeros((), device=p.device)
                         for p in params]).double().sum()
    return grads / weights


def speed_gap(m_bypass: dict[str, float], m_main: dict[str, float], order: tuple[str, str]) -> tuple[dict, float]:
    """BDR_m = log10(M_bypass(m) / M_main(m)) and d = BDR_first - BDR_second."""
    bdr = {m: math.log10(m_bypass[m] / m_main[m]) for m in order}
    return bdr, bdr[order[0]] - bdr[order[1]]


def utilisation_rates(acc_mmtm: dict[str, float], acc_bypass: dict[str, float]) -> dict[str, float]:
    """The paper's u(other | m) = (A(m, other) - A(m)) / A(m, other), keyed by m: how much m's
    branch relies on the other modality (A(m): its accuracy with the cross-modal flow cut)."""
    return {m: (acc_mmtm[m] - acc_bypass[m]) / acc_mmtm[m] for m in acc_mmtm}


# ----------------------------------------------------------------------------------------- MMTM


class MMTM(nn.Module):
    """A multimodal transfer module between two maps (widths: modality -> channels), keeping the
    running averages of its gates (over training steps) and of its squeezes (over an epoch's)."""

    def __init__(self, widths: dict[str, int], ratio: float, own_average: bool) -> None:
        super().__init__()
        self.names = tuple(widths)
        hidden = int(2 * sum(widths.values()) / ratio)
        self.fc_squeeze = nn.Linear(sum(widths.values()), hidden)
        self.fc_excite = nn.ModuleDict({m: nn.Linear(hidden, c) for m, c in widths.items()})
        for m, c in widths.items():
            self.register_buffer(f"gate_avg_{m}", torch.zeros(c))
            self.register_buffer(f"squeeze_avg_{m}", torch.zeros(c))
        # whose gates each average takes: its own, or (the release) the first modality's for both
        self.average_of = {m: m if own_average else self.names[0] for m in self.names}
        self.steps = 0  # training steps in the gate averages
        self.squeezed = 0  # training steps in the squeeze averages (this epoch)

    def gates(self, squeezed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        e = torch.relu(self.fc_squeeze(torch.cat([squeezed[m] for m in self.names], dim=1)))
        return {m: torch.sigmoid(self.fc_excite[m](e)) for m in self.names}

    def bypass_gates(self, squeezed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's gate with the other's squeeze replaced by its average (no cross-modal flow)."""
        out = {}
        for m in self.names:
            alone = {o: squeezed[m] if o == m else self.average(f"squeeze_avg_{o}", squeezed[m].shape[0])
                     for o in self.names}
            out[m] = self.gates(alone)[m]
        return out

    def average(self, buffer: str, batch: int) -> torch.Tensor:
        return getattr(self, buffer).expand(batch, -1)

    def forward(self, h: dict[str, torch.Tensor], frames: dict[str, int], *, caring: str | None = None,
                bypass: bool = False, update: bool = False) -> dict[str, torch.Tensor]:
        squeezed = {m: squeeze(h[m], frames[m]) for m in self.names}
        gates = self.bypass_gates(squeezed) if bypass else self.gates(squeezed)
        if update:
            self.update_averages(gates, squeezed)
        if caring is not None:
            gates[caring] = self.average(f"gate_avg_{caring}", gates[caring].shape[0])
        return {m: excite(h[m], gates[m], frames[m]) for m in self.names}

    @torch.no_grad()
    def update_averages(self, gates: dict[str, torch.Tensor], squeezed: dict[str, torch.Tensor]) -> None:
        for m in self.names:
            gate = gates[self.average_of[m]].float().mean(0)
            setattr(self, f"gate_avg_{m}", running_mean(getattr(self, f"gate_avg_{m}"), gate, self.steps))
            s = squeezed[m].float().mean(0)
            setattr(self, f"squeeze_avg_{m}", running_mean(getattr(self, f"squeeze_avg_{m}"), s, self.squeezed))
        self.steps += 1
        self.squeezed += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps, "squeezed": self.squeezed}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps, self.squeezed = state["steps"], state["squeezed"]


# ----------------------------------------------------------------------------------- the method


@METHODS.register("greedy")
class Greedy(Method):
    # BalanceBenchmark's taxonomy (spec/peers.md section 1): Greedy changes the forward pass (MMTM)
    family = "feed-forward"
    Params = GreedyParams

    def __init__(self, params: GreedyParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) != 2:
            raise ConfigError(f"method greedy is defined for exactly 2 modalities (MMTM and the learning-speed gap "
                              f"d = BDR_0 - BDR_1 are pairwise in its releases); this dataset has {len(names)}: "
                              f"{', '.join(names)}")
        self.fusion_name = setup.fusion
        # built first, as joint training builds it: with mmtm_stages=0 the two start identical
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        self.positions = self.mmtm_positions(params.mmtm_stages)
        self.mmtms = nn.ModuleList()
        for j in range(len(next(iter(self.positions.values())))):
            widths = {m: stages_of(self.encoders[m], m, "method greedy").widths[self.positions[m][j]] for m in names}
            if params.running_average == "release" and len(set(widths.values())) > 1:
                raise ConfigError(f"method.running_average=release (the release's average of the first modality's "
                                  f"gates for both) needs equal widths at each MMTM; MMTM {j + 1} joins {widths}; "
                                  "set method.running_average=own")
            self.mmtms.append(MMTM(widths, params.ratio, own_average=params.running_average == "own"))
        # host-side state, saved through get_extra_state
        self.m_bypass = dict.fromkeys(names, 0.0)
        self.m_main = dict.fromkeys(names, 0.0)
        self.caring: str | None = None  # the modality the coming step cares for (re-balancing)
        self.curation_step = 0
        self.bdr = dict.fromkeys(names, 0.0)
        self.speed = 0.0

    def mmtm_positions(self, n: int) -> dict[str, list[int]]:
        """Per modality, the blocks (0-based) that an MMTM follows: the last n of each encoder."""
        if n == 0:
            return {m: [] for m in self.modality_names}
        blocks = {m: len(stages_of(self.encoders[m], m, "method greedy").blocks) for m in self.modality_names}
        n = min(n, *blocks.values())
        return {m: list(range(k - n, k)) for m, k in blocks.items()}

    # ---- the forward pass through both branches
    def branches(self, inputs: dict[str, torch.Tensor], *, caring: str | None = None, bypass: bool = False,
                 update: bool = False) -> dict[str, torch.Tensor]:
        if not self.mmtms:
            return self.encode(inputs)
        stages = {m: self.encoders[m].stages() for m in self.modality_names}
        h, frames, done = {}, {}, dict.fromkeys(self.modality_names, 0)
        for m, s in stages.items():
            h[m], frames[m] = s.enter(inputs[m])
        for j, mmtm in enumerate(self.mmtms):
            for m, s in stages.items():
                h[m] = run_blocks(s.blocks[done[m]:self.positions[m][j] + 1], h[m])
                done[m] = self.positions[m][j] + 1
            h = mmtm(h, frames, caring=caring, bypass=bypass, update=update)
        return {m: s.pool(run_blocks(s.blocks[done[m]:], h[m]), frames[m]) for m, s in stages.items()}

    def loss(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Joint training's loss for the run's head: late fusion sums the branches' cross-entropies."""
        if self.fusion_name == "late":
            return sum(self.cross_entropy(o, labels) for o in self.fusion.per_modality(feats).values())
        return self.cross_entropy(self.fusion(feats), labels)

    # ---- conditional learning speeds
    def bypass_parameters(self, m: str) -> list[nn.Parameter]:
        """m's MMTM parameters: its gates' and the shared squeeze of every MMTM."""
        return [p for mmtm in self.mmtms for p in (*mmtm.fc_squeeze.parameters(), *mmtm.fc_excite[m].parameters())]

    def main_parameters(self, m: str) -> list[nn.Parameter]:
        """m's branch: its encoder, and its own head where the fusion has one per modality."""
        heads = getattr(self.fusion, "heads", None)
        return [*self.encoders[m].parameters(), *(heads[m].parameters() if heads is not None else ())]

    def learning_speeds(self) -> None:
        """Adds this step's gradient-to-weight ratios to the sums; updates BDR_m and d."""
        names = self.modality_names
        ratios = torch.stack([grad_weight_ratio(f(m)) for m in names
                              for f in (self.bypass_parameters, self.main_parameters)]).tolist()
        for k, m in enumerate(names):
            self.m_bypass[m] += ratios[2 * k]
            self.m_main[m] += ratios[2 * k + 1]
        self.bdr, self.speed = speed_gap(self.m_bypass, self.m_main, names)

    def next_caring(self, unlocked: bool) -> None:
        """The release's on_backward_end: whom the coming steps care for."""
        names, p = self.modality_names, self.params
        if p.rebalance == "random":
            draw = int(torch.randint(3, ()).item()) if unlocked else 0
            self.caring = {0: None, 1: names[1], 2: names[0]}[draw]
        elif self.caring is not None and unlocked:
            self.curation_step += 1
            if self.curation_step == p.window:
                self.caring = None
        else:
            self.learning_speeds()
            self.caring = None
            if unlocked and abs(self.speed) > p.epsilon:
                self.caring, self.curation_step = names[0] if self.speed > 0 else names[1], 0

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        caring = self.caring
        ctx.zero_grad()
        with ctx.autocast():
            loss = self.loss(self.branches(batch.inputs, caring=caring, update=bool(self.mmtms)), batch.labels)
        ctx.backward(loss)
        if self.params.rebalance != "off":
            self.next_caring(unlocked=ctx.epoch >= self.params.warmup_epochs)
        ctx.step()
        out = {"loss": loss.detach()}
        if self.params.rebalance != "off":
            out["speed"] = torch.tensor(self.speed)
            for m in self.modality_names:
                out[f"bdr.{m}"] = torch.tensor(self.bdr[m])
                out[f"rebalance.{m}"] = torch.tensor(float(caring == m))
        return out

    def on_epoch_start(self, epoch: int) -> None:
        for mmtm in self.mmtms:  # the squeeze averages are this epoch's
            mmtm.squeezed = 0

    def predict(self, batch: Batch) -> Prediction:
        feats = self.branches(batch.inputs)
        own = self.fusion.per_modality(feats)
        logs = {}
        if own is not None and self.mmtms:
            alone = self.fusion.per_modality(self.branches(batch.inputs, bypass=True))
            for m in self.modality_names:
                logs[f"acc_mmtm.{m}"] = accuracy(own[m], batch.labels)
                logs[f"acc_bypass.{m}"] = accuracy(alone[m], batch.labels)
        return Prediction(self.fusion(feats), own, logs)

    def predict_masked(self, batch: Batch, present: frozenset[str], mask: str = "features") -> Prediction:
        """With MMTMs the encoders run block by block (branches), so an absent modality's features
        are zeroed where its branch ends, after the MMTMs, before the head."""
        if mask == "input" or not self.mmtms:
            return super().predict_masked(batch, present, mask)
        feats = {m: f if m in present else torch.zeros_like(f) for m, f in self.branches(batch.inputs).items()}
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each branch with the cross-modal flow cut: a function of its own modality alone."""
        return self.branches(batch.inputs, bypass=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"m_bypass": self.m_bypass, "m_main": self.m_main, "caring": self.caring,
                "curation_step": self.curation_step, "bdr": self.bdr, "speed": self.speed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.m_bypass, self.m_main = dict(state["m_bypass"]), dict(state["m_main"])
        self.caring, self.curation_step = state["caring"], state["curation_step"]
        self.bdr, self.speed = dict(state["bdr"]), state["speed"]


def run_blocks(blocks: tuple[nn.Module, ...], h: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h)
    return h


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == labels).float().mean()
