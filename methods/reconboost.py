"""ReconBoost: alternating boosting over modalities (Hua, Xu, Bao, Yang, Huang; ICML 2024, arXiv 2405.09321).

Each modality m has a learner phi_m = h o encoder_m, all sharing ONE head h (the code's
`common_space`: every `model.fc` is `net_ensemble.head`). The ensemble predicts
F(x) = boost_rate * sum_{m in members} phi_m(x_m), with a learnable scalar boost_rate. Training
runs in stages; stage s picks the modality m = order[s mod M] and has two phases:

1. Alternating boosting (`epochs_per_stage` epochs): only phi_m is trained (its encoder and the
   head), against the ensemble of the OTHER members, E_{-m} = boost_rate * sum_{k != m} phi_k,
   computed without gradient:
       L_boost = mean_i [ -w1 mean_c(y_ic log p_ic) + w2 mean_c(y_ic q_ic log p_ic) ]
             = mean_i [ -(w1 - w2 q_i,y) log p_i,y / C ],
   p = softmax(phi_m), q = softmax(E_{-m}) (detached), y one-hot. A sample the other modalities
   already classify (q_y near 1) weighs less: the paper's KL reconcilement in its gradient-boosting
   form. While E_{-m} is empty (the release, stage 0) q = 1 (the code's constant c0, whose softmax
   over one column is 1). From the second stage on the code also computes its "ga" (memory
   consolidation) term, alpha * MSE(softmax(phi_m).detach(), softmax(phi_prev).detach()) with prev
   the previous stage's modality, an extra forward of that learner in training mode (its batch-norm
   statistics move). Both sides are detached, so the term has NO gradient: it changes the reported
   loss and the batch-norm running statistics, not the update.
2. Global rectification (`correct_epochs` epochs): every member's encoder, the head and boost_rate
   trained jointly by CE(F(x), y).
Evaluation: F over the members (softmax-argmax in the code, the same class); each modality's own
logits are phi_m(x_m).

Released code: github.com/huacong/ReconBoost @ 14ab57a, train.py (R:<line>; train_MSA.py is the
same loop for three modalities) and models/dynamic_net.py (D:<line>). Phase 1 R:295-357, the loss
R:339-340, the ga term R:344-352, the ensemble forward D:96-135, phase 2 R:369-402 with
D:137-170, the schedule schedule.py (fixed_mode: stage % M in the dataset's order, audio first).
Second reference: BalanceBenchmark @ 4c1482f, balancemm/trainer/ReconBoost_trainer.py (B:<line>)
and balancemm/models/avclassify_model.py `BaseClassifierReconBoostModel` (lines 737-829).

Variants (`variant`), each transcribed beside this method in tests/test_reconboost.py:
- "release" (default): the code without `--use_pretrain` (its default; the README's runs load
  unimodal checkpoints the suite does not have). The ensemble starts empty and modality m joins
  it when its first phase 1 ends (DynamicNet.add, R:366); each phase starts a fresh SGD (R:296,
  R:371), here `reset_optimizer_state()` at each phase start (the harness's optimizer, its learning
  rate and schedule running on: the code's step decay per 30 stages, R:445-451, is a step schedule
  here); the ga term from stage 1 (R:345). Defaults: 4 + 4 epochs per stage (its README's
  commands), w1 5, w2 1, alpha 0.5, boost_rate 1.0, head Linear(d, 256)-ReLU-Linear(256, C)
  (D:5-15, PyTorch's default init).
- "balancebenchmark": its trainer (B:73-88, 212-313): every modality is a member from the start
  (its forward sums all but the masked one, B:332), ONE optimizer for the whole run (never
  reset), stages of one epoch per phase (`T_epochs` 1, B:224, B:268), boost_rate 0.01
  (avclassify_model.py:742), a linear shared head (fusion "shared": SharedHead = Linear(d, C)),
  and the ga term from its second epoch on (B:340, `current_epoch == 0`: its epoch runs all M
  stages, so here from stage M).
Its scheduler steps once per its epoch (M stages, 2M passes over the data at T = 1); the suite's
once per pass: its recipe rescales the step size. Its `modulation_starts/ends` window (0-80 over 30
epochs, always open; outside it the trainer fails on an undefined `loss`) is not modelled.

Paper vs code: the paper presents memory consolidation as a regulariser of the learner; in both
releases it carries no gradient (above). The paper's formula could not be read here (no access to
the PDF), so no gradient-carrying variant is offered; `use_ga` (the code's flag) switches the term
and its extra forward off. The code keeps separate learning rates for the two phases (m_lr, e_lr),
equal (0.01) in every released command; the suite's one optimizer has one.

Departures and choices:
- Evaluation happens every epoch (the code tests after each stage, R:407-408). `select`
  "stage_end" (default) lets only a stage's last epoch (after its global rectification) and the
  run's last epoch be selected, as the code's test points; "any" lets every epoch. The code saves
  its best from stage 3 on (R:420); not modelled.
- Evaluated mid-stage, the ensemble includes the modality in training (its own phase 1 has not
  ended, so the code's DynamicNet would not hold it yet in the release's first stages).
- The code sums the members in the order they were (re-)added (DynamicNet.add moves a re-added
  learner last); here in the dataset's order. Only float rounding differs (three or more members).
- Modalities need one feature size (one shared head); `order` sets the alternation (default: the
  dataset's order, the code's audio-first). M >= 2, any M (train_MSA.py runs three).

Each step reports `loss` (phase 1: L_boost + alpha * ga, the code's `loss`; phase 2: the CE),
`boost_loss`, `ga_loss` (when computed), `ensemble_conf` (the batch mean of q_y, the others'
confidence in the true class), `ce_ensemble` (phase 2), `phase` (1, 2), `learner.<m>` (1 for
each modality whose encoder this step trains) and `boost_rate`. Cost per step: phase 1, one
forward of the learner and one (no-grad) of every other member, plus one of the previous stage's
learner for ga, one backward; phase 2, one forward per member and one backward.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup

# what each variant leaves unset: (epochs_per_stage, correct_epochs, boost_rate, head)
VARIANT_DEFAULTS = {"release": (4, 4, 1.0, "mlp"), "balancebenchmark": (1, 1, 0.01, "linear")}


class ReconBoostParams(Strict):
    variant: Literal["release", "balancebenchmark"] = "release"
    epochs_per_stage: int | None = Field(None, ge=0)  # phase 1 epochs; None: the variant's (4 / 1)
    correct_epochs: int | None = Field(None, ge=0)  # phase 2 (global rectification); None: 4 / 1
    # L_boost's two weights; ranges around the README's (w1 5 CREMA-D, 4 AVE and ModelNet40; w2 1 throughout).
    # alpha is not searched: its term has no gradient, so it changes no update
    weight1: float = tunable(5.0, 1.0, 20.0, log=True, ge=0)
    weight2: float = tunable(1.0, 0.1, 5.0, log=True, ge=0)
    alpha: float = Field(0.5, ge=0)  # the ga term's weight (no gradient in either release)
    use_ga: bool = True
    boost_rate: float | None = None  # its initial value; None: 1.0 / 0.01
    head: Literal["mlp", "linear"] | None = None  # None: mlp / linear
    head_hidden: int | None = Field(None, gt=0)  # the mlp head's width; None: the code's 256
    order: list[str] | None = None  # the alternation; None: the dataset's modality order
    select: Literal["stage_end", "any"] = "stage_end"

    @model_validator(mode="after")
    def _consistent(self) -> ReconBoostParams:
        e1, e2, _, _ = self.resolved()
        if e1 + e2 == 0:
            raise ValueError("epochs_per_stage + correct_epochs is 0: a stage would have no epoch; "
                             "give one of them at least 1")
        if self.head_hidden is not None and self.resolved()[3] != "mlp":
            raise ValueError(f"head_hidden applies only to head='mlp' (the head is {self.resolved()[3]!r}, "
                             f"variant {self.variant!r})")
        return self

    def resolved(self) -> tuple[int, int, float, str]:
        """(epochs_per_stage, correct_epochs, boost_rate, head), the variant's where unset."""
        given = (self.epochs_per_stage, self.correct_epochs, self.boost_rate, self.head)
        return tuple(d if g is None else g for g, d in zip(given, VARIANT_DEFAULTS[self.variant]))  # type: ignore[return-value]


# ------------------------------------------------------------------------- the math (pure)


def boosting_loss(logits: torch.Tensor, others: torch.Tensor | None, labels: torch.Tensor,
                  weight1: float, weight2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_boost, q_y): R:337-340 / B:336-338, with q = 1 where no other member exists (the code's
    constant c0). `others` (the other members' ensemble logits) is detached here."""
    logp = F.log_softmax(logits.float(), dim=1)
    target = F.one_hot(labels, logp.shape[1]).to(logp.dtype)
    q = torch.ones_like(logp[:, :1]) if others is None else F.softmax(others.detach().float(), dim=1)
    per_sample = -weight1 * (target * logp).mean(-1) + weight2 * (target * q * logp).mean(-1)
    return per_sample.mean(), (target * q).sum(1)


def consolidation_term(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """The code's ga loss (R:349, B:344): MSE of the two learners' softmaxes, both detached."""
    return F.mse_loss(F.softmax(current.detach().float(), 1), F.softmax(previous.detach().float(), 1))


def stage_and_phase(epoch: int, epochs_per_stage: int, correct_epochs: int) -> tuple[int, int]:
    """(stage, phase 1 or 2) of a 0-based epoch."""
    stage, within = divmod(epoch, epochs_per_stage + correct_epochs)
    return stage, 1 if within < epochs_per_stage else 2


def ensemble_members(stage: int, phase: int, order: tuple[str, ...], everyone: bool) -> tuple[str, ...]:
    """The modalities in the ensemble during `stage`'s `phase`: all of them (`everyone`), else those
    whose first phase 1 has ended (a modality joins as its phase 1 ends), in `order`."""
    if everyone:
        return order
    joined = set(order[: min(stage, len(order))]) | ({order[stage % len(order)]} if phase == 2 else set())
    return tuple(m for m in order if m in joined)


def shared_head(kind: str, dim: int, hidden: int, num_classes: int) -> nn.Module:
    if kind == "mlp":  # D:5-15
        return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return nn.Linear(dim, num_classes)  # BalanceBenchmark's SharedHead


# ------------------------------------------------------------------------------- the method


@METHODS.register("reconboost")
class ReconBoost(Method):
    family = "optimisation"  # BalanceBenchmark's taxonomy (it alternates what each step optimises)
    Params = ReconBoostParams

    def __init__(self, params: ReconBoostParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method reconboost alternates between two or more modalities; the dataset has "
                              f"{len(names)} ({', '.join(names)}): use method.name=unimodal")
        self.order = self._order(params.order, names)
        dims = setup.feature_dims()
        if len(set(dims.values())) != 1:
            shown = ", ".join(f"{m}={d}" for m, d in dims.items())
            raise ConfigError(f"method reconboost shares one head across modalities, so every encoder needs the "
                              f"same out_dim; got {shown}: set model.encoders.<modality>.out_dim to one value")
        self.e1, self.e2, rate, head = params.resolved()
        self.release = params.variant == "release"
        self.head = shared_head(head, dims[names[0]], params.head_hidden or 256, setup.num_classes)
        self.boost_rate = nn.Parameter(torch.tensor(float(rate)))
        self.last_epoch = setup.epochs - 1
        # who is in the ensemble, in the modality order, for predict (a buffer: best.pt keeps it)
        self.register_buffer("members", torch.zeros(len(names)))
        self.set_members(self.members_in(0, 2))

    @staticmethod
    def _order(order: list[str] | None, names: tuple[str, ...]) -> tuple[str, ...]:
        if order is None:
            return names
        if sorted(order) != sorted(names):
            raise ConfigError(f"method.order must name each modality once: {', '.join(names)}; "
                              f"got {', '.join(order) or '(none)'}")
        return tuple(order)

    # ---- the schedule
    def position(self, epoch: int) -> tuple[int, int]:
        return stage_and_phase(epoch, self.e1, self.e2)

    def members_in(self, stage: int, phase: int) -> tuple[str, ...]:
        return ensemble_members(stage, phase, self.order, everyone=not self.release)

    def set_members(self, members: tuple[str, ...]) -> None:
        self.members.copy_(torch.tensor([float(m in members) for m in self.modality_names]))

    def on_epoch_start(self, epoch: int) -> None:
        stage, phase = self.position(epoch)
        # predict after this epoch: the members once this phase is done (the learner included)
        self.set_members(self.members_in(stage, 2))
        phase_start = epoch % (self.e1 + self.e2) in (0, self.e1)
        if self.release and phase_start:  # the code's fresh SGD per phase (R:296, R:371)
            self.step_context.reset_optimizer_state()

    def selectable(self, epoch: int) -> bool:
        if self.params.select == "any" or epoch == self.last_epoch:
            return True
        return (epoch + 1) % (self.e1 + self.e2) == 0

    def epoch_log(self) -> dict[str, Any]:
        return {"boost_rate": float(self.boost_rate.detach())}

    # ---- the steps
    def learner(self, m: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoders[m](inputs[m]))

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        stage, phase = self.position(self.step_context.epoch)
        if phase == 1:
            out = self.boosting_step(batch, stage)
        else:
            out = self.rectification_step(batch, self.members_in(stage, 2))
        return {**out, "phase": torch.tensor(float(phase)), "boost_rate": self.boost_rate.detach().clone()}

    def boosting_step(self, batch: Batch, stage: int) -> dict[str, torch.Tensor]:
        ctx, p, inputs = self.step_context, self.params, batch.inputs
        m = self.order[stage % len(self.order)]
        others = [k for k in self.members_in(stage, 1) if k != m]
        ctx.zero_grad()
        with ctx.autocast():
            ensemble = None
            if others:  # D:122-135: no gradient, members in the ensemble's order
                with torch.no_grad():
                    ensemble = sum(self.learner(k, inputs) for k in others)
                ensemble = self.boost_rate.detach() * ensemble
            logits = self.learner(m, inputs)
        boost, q_y = boosting_loss(logits, ensemble, batch.labels, p.weight1, p.weight2)
        loss, out = boost, {}
        if p.use_ga and stage >= (1 if self.release else len(self.order)):
            previous = self.order[(stage - 1) % len(self.order)]
            with ctx.autocast():
                ga = consolidation_term(logits, self.learner(previous, inputs))  # moves its BN stats
            loss = boost + p.alpha * ga
            out["ga_loss"] = ga.detach()
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "boost_loss": boost.detach(), "ensemble_conf": q_y.mean().detach(), **out,
                **{f"learner.{k}": torch.tensor(float(k == m)) for k in self.modality_names}}

    def rectification_step(self, batch: Batch, members: tuple[str, ...]) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            fused = self.boost_rate * sum(self.learner(k, batch.inputs) for k in members)
            loss = self.cross_entropy(fused, batch.labels)
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "ce_ensemble": loss.detach(),
                **{f"learner.{k}": torch.tensor(float(k in members)) for k in self.modality_names}}

    def predict(self, batch: Batch) -> Prediction:
        logits = {m: self.learner(m, batch.inputs) for m in self.modality_names}
        fused = self.boost_rate * sum(w * logits[m].float() for w, m in zip(self.members, self.modality_names))
        return Prediction(fused, logits)
