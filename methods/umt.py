"""UMT: uni-modal teachers (Du et al., ICML 2023, "On Uni-Modal Feature Learning in Supervised
Multi-Modal Learning"; first as arXiv 2106.11059, "Improving Multi-Modal Learning with Uni-Modal
Teachers").

A late-fusion model trained by joint training's fused cross-entropy plus, per modality, a
distillation term that pulls the multimodal model's encoder features towards those of a unimodal
model trained alone on that modality (its teacher, frozen):

    L = CE(fusion(f_1, ..., f_M), y) + scaling * sum_m MSE(f_m, g_m),   g_m = teacher_m's encoder(x_m)

where MSE is the mean over the batch and the feature entries (torch's MSELoss), in the epochs
`modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based); outside them a step is a
joint-training step, and with scaling 0 no teacher runs at all (joint training exactly). One
backward and one optimizer step per step; the teachers run forward only, without gradient.

The teachers (`teachers`):
- `store` (default): the unimodal runs of the same sweep (Method.requires: per modality m this
  run's config with `method: {name: unimodal, modality: m}`, so the same data, encoders, seed,
  optimiser and epochs). The harness plans and trains them first and hands their best-val weights
  (best.pt) here; a teacher not finished is a one-line error naming its run.
- `in_run`: the teachers are trained inside this run first, as `unimodal` runs would be: epochs
  0 .. teacher_epochs-1 train one unimodal model per modality (a copy of this run's initial
  encoder and a head initialised as a unimodal run's, each its own cross-entropy, summed; the
  student is not touched), then the teachers are frozen, the optimizer and schedule start afresh
  and the remaining epochs train UMT (the window counts from there). Departures from `store`: the
  teachers are those of the last teacher epoch, not of their best validation epoch, their schedule
  is this run's (a cosine schedule spans the whole run), and the UMT stage's batches are those of
  its epochs' numbers in the run. Only the UMT stage's epochs are selectable.

Released code. The paper's own release could not be found in the code store (searched by title
and authors); the reference is BalanceBenchmark's `UMTTrainer` (GeWu-Lab/BalanceBenchmark @
4c1482f, balancemm/trainer/UMT_trainer.py; its defaults in configs/trainer_config.yaml L62-66:
scaling 10, modulation 0-80; `alpha: 1` is never read): training_step L130-145 computes
`loss = CE(out, label)` and, inside the window, for each modality, under no_grad
`loaded_model[m](batch)` and `loss += scaling * MSE(teacher encoder_result[m], model.encoder_result[m])`,
then one backward. The teachers are `unimodalTrainer_<m>` runs found as "the newest" directory
(L38-45); here they are found by config (bench.requirements). Where the paper is silent and
the code decides:
- `teacher_mode`: BalanceBenchmark builds the teachers and never calls `.eval()` on them (L40-44;
  the trainer's model.train()/eval() do not reach them), so they run in training mode: batch
  statistics in BatchNorm (and the running statistics updated, which nothing reads), dropout on.
  `train` (default) reproduces that; `eval` runs them as frozen models usually run (running
  statistics, no dropout). With the MLP encoders (no BatchNorm, no dropout) the two are equal.
- The distillation target is the teacher's encoder output (its pooled feature, before the head).
The paper's distillation loss could not be checked against its text (the text was not
reachable); BalanceBenchmark's mean squared error is the only form implemented.

Family: `objective` (BalanceBenchmark's taxonomy, spec/peers.md 1.6: UMT changes the loss).
Each step reports `loss` (what was optimised), `ce` (the fused cross-entropy), `distill.<m>` (the
unscaled MSE of modality m; 0 outside the window) and `distilling` (1 inside it); in the in-run
teacher stage, `teacher.<m>` (each teacher's cross-entropy). Cost: one backward; forward passes,
counted per encoder: the student's M plus the teachers' M inside the window (2 per step), M
outside it; M (the teachers') in the in-run teacher stage.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.methods.unimodal import Unimodal, UnimodalParams
from mmbalance.models.fusion import build_fusion


class UMTParams(Window):
    # BalanceBenchmark's configs/trainer_config.yaml (UMT: scaling 10, modulation 0-80)
    scaling: float = tunable(10.0, 1.0, 50.0, log=True, ge=0)
    modulation_ends: int | None = Field(80, ge=0)  # None: no end
    teachers: Literal["store", "in_run"] = "store"
    teacher_epochs: int | None = Field(None, ge=1)  # in_run: the teacher stage's epochs
    teacher_mode: Literal["train", "eval"] = "train"  # train: BalanceBenchmark's (see the docstring)

    @model_validator(mode="after")
    def _consistent(self) -> UMTParams:
        if (self.teachers == "in_run") != (self.teacher_epochs is not None):
            raise ValueError("teacher_epochs is the in-run teacher stage's length: give it with teachers=in_run "
                             f"and only then (teachers={self.teachers!r}, teacher_epochs={self.teacher_epochs})")
        return self


def distillation_losses(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality, the mean squared error between the student's and the teacher's features."""
    return {m: F.mse_loss(student[m].float(), teacher[m].float()) for m in teacher}


def unimodal_requirements(modalities: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per modality, this run's config as a `unimodal` run of that modality (Method.requires)."""
    return {m: {"method": {"name": "unimodal", "modality": m}} for m in modalities}


def in_run_unimodals(setup: MethodSetup) -> nn.ModuleDict:
    """One unimodal model per modality, each as a `unimodal` run of this config starts: a copy of
    this run's (untouched) encoder and a head drawn from the random stream where that run draws it,
    the stream left as it was (so the rest of the model is drawn as without them)."""
    models = {}
    for m in setup.feature_dims():
        with torch.random.fork_rng(devices=[]):
            own = MethodSetup(nn.ModuleDict({m: copy.deepcopy(setup.encoders[m])}), setup.num_classes,
                              setup.modalities)
            models[m] = Unimodal(UnimodalParams(modality=m), own)
    return nn.ModuleDict(models)


@METHODS.register("umt")
class UMT(Method):
    family = "objective"  # BalanceBenchmark's taxonomy: a change of the loss
    Params = UMTParams

    @classmethod
    def requires(cls, params: UMTParams, modalities: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return unimodal_requirements(modalities) if params.teachers == "store" and params.scaling > 0 else {}

    def __init__(self, params: UMTParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if params.teachers == "in_run" and params.teacher_epochs >= setup.epochs:
            raise ConfigError(f"method.teacher_epochs={params.teacher_epochs} leaves no UMT epochs in train.epochs="
                              f"{setup.epochs}; train.epochs is the teacher stage plus the UMT stage")
        # the teachers first: in_run draws their heads where unimodal runs draw theirs (the stream
        # is left as it was, so the fusion head is drawn as joint training draws it)
        if params.scaling == 0:
            self.teachers = nn.ModuleDict()  # joint training: no teacher is needed or run
        elif params.teachers == "store":
            self.teachers = nn.ModuleDict({m: setup.require(m) for m in self.modality_names})
        else:
            self.teachers = in_run_unimodals(setup)
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        self.stage_start = params.teacher_epochs or 0
        self.distilling = params.teachers == "store"  # the teachers are trained and frozen

    # ---- stages (in_run: teachers first)
    def on_epoch_start(self, epoch: int) -> None:
        self.distilling = epoch >= self.stage_start
        if self.params.teachers == "in_run":
            self.teachers.requires_grad_(not self.distilling)
            if epoch == self.stage_start:  # the UMT stage starts as a run of its own would
                self.step_context.reset_optimizer()
        self.train(self.training)

    def train(self, mode: bool = True) -> UMT:
        super().train(mode)
        if self.distilling and self.params.teacher_mode == "eval":
            self.teachers.eval()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        # in_run: the same groups in both stages (resume loads them); frozen parameters get no gradient
        return [{"params": list(self.parameters())}] if self.params.teachers == "in_run" else super().param_groups()

    def selectable(self, epoch: int) -> bool:
        return epoch >= self.stage_start

    # ---- steps
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.distilling:
            return self.teacher_step(batch)
        ctx = self.step_context
        p = self.params
        window = bool(self.teachers) and p.in_window(ctx.epoch - self.stage_start)
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            ce = self.cross_entropy(self.fusion(feats), batch.labels)
            losses = {}
            if window:
                with torch.no_grad():
                    targets = {m: self.teachers[m].encode(batch.inputs)[m] for m in self.teachers}
                losses = distillation_losses(feats, targets)
        loss = ce + p.scaling * sum(losses.values()) if losses else ce
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "ce": ce.detach(), "distilling": torch.tensor(float(window)),
                **{f"distill.{m}": losses[m].detach() if m in losses else torch.zeros(()) for m in self.teachers}}

    def teacher_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The in-run teacher stage: each teacher's unimodal cross-entropy, summed; one backward, one step."""
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            losses = {m: self.cross_entropy(t.predict(batch).fused, batch.labels) for m, t in self.teachers.items()}
        loss = sum(losses.values())
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), **{f"teacher.{m}": v.detach() for m, v in losses.items()}}

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
