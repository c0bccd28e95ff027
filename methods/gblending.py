"""Gradient-Blending: loss weights from overfitting-to-generalisation ratios (Wang, Tran & Feiszli,
CVPR 2020, "What Makes Training Multi-Modal Classification Networks Hard?", arXiv 1905.12681).

The model is late fusion with a classifier per modality beside the fused one, trained by the
blended loss

    L = sum_m w_m CE(logits_m, y) + w_fused CE(fused, y),   the weights summing to 1.

The weights come from each branch's overfitting-to-generalisation behaviour, measured by training
that branch alone for a while and watching its loss on the data it trains on (T) and on data it
never sees (V, a held-out part of TRAIN, never val or test): between two checkpoints N and N + n,

    O = L_V - L_T (the overfitting),   dO = O_{N+n} - O_N,   dG = L_V(N) - L_V(N+n),
    OGR = |dO / dG|,                   w_k proportional to dG_k / dO_k^2, the weights summing to 1.

Online G-Blend (the paper's online variant, the one implemented) re-estimates the weights every
`interval` epochs ("super-epoch") from the current model: each branch k (every modality and the
fused head) is trained on trial for `estimate_epochs` epochs from the current weights with a fresh
optimizer, the losses recorded, and the trial undone (`ctx.trial`). Offline G-Blend is
interval = estimate_epochs = train.epochs: one estimate, from the initial model, at epoch 0.

The held-out part comes from the harness: `holdout_fraction()` asks for `holdout` of the training
split (default 0.1), which is then never trained on; `ctx.holdout_batches()` lends it. The paper
holds part of train out as V; the fraction is this suite's choice (BalanceBenchmark uses val).

There is no release by the authors (none found; BalanceBenchmark's is the one public implementation
of the field's benchmarks), so the default variant is the paper's. Its full text could not be
fetched where this file was written: the variant follows the definitions above (O, dO, dG, OGR and
w proportional to dG / dO^2 over a held-out part of train), and what the paper leaves open here is
this suite's reading, named as such below:

`variant: paper` (default)
- Heads: a private linear classifier per modality on its encoder's features (the paper's late
  fusion of per-modality classifiers), beside the fusion head (any `model.fusion`). `predict`
  gives the private heads as the per-modality view.
- Branch k's trial: modality k's encoder and head trained by CE(head_k(f_k)) alone; the fused
  branch: encoders and fusion head by CE(fused). Checkpoints N = before the trial and N + n =
  after its `estimate_epochs` epochs; at each, L_T and L_V are per-sample mean cross-entropies of
  an evaluation-mode pass over the trained rows (`ctx.train_batches()`, the training views) and
  over the held-out rows.
- w*_k = max(dG_k, 0) / max(dO_k^2, 1e-12), normalised to sum to 1. The paper's derivation assumes
  the held-out loss falls (dG > 0); a branch whose held-out loss did not fall gets weight 0 (the
  clamp is this suite's); if none fell, the previous weights are kept (at epoch 0: fused 1).

`variant: balancebenchmark` (GeWu-Lab/BalanceBenchmark @ 4c1482f,
balancemm/trainer/GBlending_trainer.py: `training_step` l.292-303, `super_epoch_origin` l.306-376,
`fit` l.89-106; the temp model and its optimizer, balancemm/train.py l.82-88; the per-modality
logits, balancemm/models/avclassify_model.py `unimodality_calculate` l.277-301; config
configs/trainer_config.yaml GBlending: method online, super_epoch 10):
- Heads: the fusion head's own per-modality logits (concat: that modality's block of the weights
  plus bias / M; sum and late: its head), so the unimodal losses also train the fusion head. Needs
  a fusion that splits by modality (concat, sum, late).
- Branch k's trial (its "temp model": a copy of the model, its optimizer reset to the state it
  was built with, i.e. base learning rate, no momentum): the WHOLE model trained by CE(fused) on
  batches whose other modalities' inputs are zeros (`padding`); the fused branch pads nothing.
  It trains `estimate_epochs` (= super_epoch) epochs and records, after trial epoch 0 and after the
  last one, L_T = the SUM over that epoch's training steps of their batch-mean losses and L_V =
  the SUM over the held-out batches of their batch-mean losses (evaluation mode). So its checkpoints
  are 1 and n epochs into the trial (n - 1 epochs apart; n >= 2 is required: at n = 1 its "now"
  losses stay 0), and O mixes sums over different numbers of batches.
- w_k = |g / o^2| with g = L_V(now) - L_V(pre) and o = O(now) - O(pre) (the sign of g dropped:
  a held-out loss that rose weighs as one that fell), normalised by the sum.
- Departure (deliberate): BalanceBenchmark measures L_V on its validation loader (its test split
  when the dataset has no validation split, balancemm/utils/data_utils.py l.16-21), the split it
  also selects on. Here V is always the held-out part of train, as the paper asks; val and test are
  never lent to a method.

Shared by both: the blended loss of the step sums the modalities' terms in the dataset's order,
then the fused term (BalanceBenchmark's `unimodal_result` order); the trial's batches are shuffled
training batches (`ctx.train_batches(generator)`, a generator seeded from torch's global RNG,
which the harness checkpoints: resume is exact); weights live in buffers. `blend: false` keeps the
weights at fused 1, unimodal 0, estimates nothing and holds nothing out: joint training (tested).

Each step reports `loss` (the blended loss), `loss.<k>` and `weight.<k>` for every modality and
`fused`; each epoch records the last estimate's `ogr.<k>`, `delta_g.<k>` and `delta_o.<k>`.
Cost: a step is joint's plus the unimodal heads; every `interval` epochs, (M + 1) x
`estimate_epochs` trial epochs (counted: they are training-mode passes and counted backward
passes) plus the loss passes (evaluation mode, not counted as steps' passes). With the default
estimate_epochs = interval, a run trains about (M + 2) times joint's epochs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import ConcatFusion, LateFusion, SumFusion, build_fusion, linear

FUSED = "fused"  # the fused branch's name beside the modalities'
MIN_DO2 = 1e-12  # the paper variant's floor on dO^2 (an unchanged overfitting gap)


class GBlendingParams(Strict):
    variant: Literal["paper", "balancebenchmark"] = "paper"
    # epochs between estimates (BalanceBenchmark's super_epoch, 10 in its config)
    interval: int = Field(10, ge=1)
    # trial epochs per branch and estimate; None: interval (BalanceBenchmark trains the temp model
    # for super_epoch epochs)
    estimate_epochs: int | None = Field(None, ge=1)
    # share of the training split held out as V; its one continuous knob (the weights are estimated, not set):
    # the range is this suite's, around its default (neither the paper's V size nor a release is known)
    holdout: float = tunable(0.1, 0.05, 0.3, gt=0, lt=1)
    # False: fixed weights (fused 1, unimodal 0) and nothing held out: joint training
    blend: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> GBlendingParams:
        if self.variant == "balancebenchmark" and self.trial_epochs < 2:
            raise ValueError(
                f"variant=balancebenchmark needs estimate_epochs >= 2 (got {self.trial_epochs}, from "
                f"{'estimate_epochs' if self.estimate_epochs else 'interval'}): it measures after the trial's "
                "first and last epochs, which must differ"
            )
        return self

    @property
    def trial_epochs(self) -> int:
        return self.estimate_epochs if self.estimate_epochs is not None else self.interval


# ------------------------------------------------------------------ the weights (pure functions)


Losses = dict[str, tuple[float, float]]  # branch -> (L_T, L_V) at one checkpoint


def loss_deltas(pre: Losses, now: Losses) -> dict[str, tuple[float, float]]:
    """Per branch (dG, dO) between checkpoints N (`pre`) and N + n (`now`): dG = L_V(N) - L_V(N+n),
    dO = O(N+n) - O(N) with O = L_V - L_T."""
    return {k: (pre[k][1] - now[k][1], (now[k][1] - now[k][0]) - (pre[k][1] - pre[k][0])) for k in pre}


def paper_weights(deltas: dict[str, tuple[float, float]]) -> dict[str, float] | None:
    """The paper's w_k = max(dG_k, 0) / dO_k^2, normalised to sum to 1; None where no branch's
    held-out loss fell."""
    raw = {k: max(dg, 0.0) / max(do * do, MIN_DO2) for k, (dg, do) in deltas.items()}
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()} if total > 0 else None


def balancebenchmark_weights(deltas: dict[str, tuple[float, float]]) -> dict[str, float]:
    """BalanceBenchmark's |g / o^2| normalised by the sum (l.361-373), with its g = L_V(now) -
    L_V(pre) = -dG and o = dO."""
    raw = {k: abs(-dg / (do**2)) for k, (dg, do) in deltas.items()}
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()}


def blended_loss(losses: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_k w_k CE_k, in the order of `losses` (the modalities, then the fused branch)."""
    total = 0
    for k, loss in losses.items():
        total = total + weights[k] * loss
    return total  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ the method


@METHODS.register("gblending")
class GBlending(Method):
    # BalanceBenchmark's taxonomy (its README, "Objective methods": ... GBlending ...): the loss
    family = "objective"
    Params = GBlendingParams

    def __init__(self, params: GBlendingParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.fusion_name = setup.fusion
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        # built after the fusion, so that encoders and fusion start as joint training's
        self.heads: nn.ModuleDict | None = None
        if params.variant == "paper":
            self.heads = nn.ModuleDict({m: linear(d, setup.num_classes) for m, d in setup.feature_dims().items()})
        elif not isinstance(self.fusion, (ConcatFusion, SumFusion, LateFusion)):
            raise ConfigError(
                f"gblending variant=balancebenchmark takes its unimodal logits from the fusion head's split, "
                f"which model.fusion={setup.fusion!r} does not have; use concat, sum or late, or variant=paper"
            )
        n = len(self.branches)
        initial = torch.zeros(n)
        initial[-1] = 1.0  # fused 1, unimodal 0: joint training until the first estimate
        self.register_buffer("weights", initial)
        # the last estimate: dG, dO per branch (diagnostics)
        self.register_buffer("delta_g", torch.zeros(n))
        self.register_buffer("delta_o", torch.zeros(n))

    @property
    def branches(self) -> tuple[str, ...]:
        return (*self.modality_names, FUSED)

    def holdout_fraction(self) -> float:
        return self.params.holdout if self.params.blend else 0.0

    # ---- logits
    def unimodal_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.heads is not None:
            return {m: self.heads[m](feats[m]) for m in self.modality_names}
        return self.fusion.per_modality(feats)

    def branch_logits(self, inputs: dict[str, torch.Tensor], branch: str) -> torch.Tensor:
        """What branch `branch` is trained and measured on in a trial."""
        if self.params.variant == "paper":
            if branch == FUSED:
                return self.fusion(self.encode(inputs))
            assert self.heads is not None
            return self.heads[branch](self.encoders[branch](inputs[branch]))
        # BalanceBenchmark: the fused output with the other modalities' inputs zeroed (l.321-323, 336)
        padded = {m: x if branch in (m, FUSED) else torch.zeros_like(x) for m, x in inputs.items()}
        return self.fusion(self.encode(padded))

    # ---- the step
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            logits = {**self.unimodal_logits(feats), FUSED: self.fusion(feats)}
            losses = {k: self.cross_entropy(logits[k], batch.labels) for k in self.branches}
            weights = dict(zip(self.branches, self.weights.clone()))  # a copy: the next estimate writes the buffer
            loss = blended_loss(losses, weights)
        ctx.backward(loss)
        ctx.step()
        out = {"loss": loss.detach()}
        for k in self.branches:
            out[f"loss.{k}"] = losses[k].detach()
            out[f"weight.{k}"] = weights[k]
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.unimodal_logits(feats))

    # ---- the estimate
    def on_epoch_start(self, epoch: int) -> None:
        if self.params.blend and epoch % self.params.interval == 0:
            self.estimate()

    def estimate(self) -> None:
        """Every branch on trial from the current model; the weights and diagnostics from its losses."""
        ctx = self.step_context
        pre: Losses = {}
        now: Losses = {}
        for branch in self.branches:
            with ctx.trial(self):
                pre[branch], now[branch] = self.trial(branch)
        self.train()
        deltas = loss_deltas(pre, now)
        weights = paper_weights(deltas) if self.params.variant == "paper" else balancebenchmark_weights(deltas)
        if weights is not None:
            self.weights.copy_(torch.tensor([weights[k] for k in self.branches]))
        self.delta_g.copy_(torch.tensor([deltas[k][0] for k in self.branches]))
        self.delta_o.copy_(torch.tensor([deltas[k][1] for k in self.branches]))

    def trial(self, branch: str) -> tuple[tuple[float, float], tuple[float, float]]:  # (pre, now)
        """Train `branch` for the trial's epochs; (L_T, L_V) at its two checkpoints."""
        epochs = self.params.trial_epochs
        if self.params.variant == "paper":
            pre = (self.mean_loss(self.step_context.train_batches(), branch), self.held_out_loss(branch))
            for _ in range(epochs):
                self.train_branch(branch)
            return pre, (self.mean_loss(self.step_context.train_batches(), branch), self.held_out_loss(branch))
        losses = []
        for e in range(epochs):  # l.324-360: after the first and after the last epoch
            trained = self.train_branch(branch)
            if e in (0, epochs - 1):
                losses.append((trained, self.held_out_loss(branch)))
        return losses[0], losses[-1]

    def train_branch(self, branch: str) -> float:
        """One trial epoch of `branch` on shuffled training batches; the sum of its batch losses."""
        ctx = self.step_context
        self.train()
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        total = torch.zeros((), dtype=torch.float64, device=ctx.device)
        for batch in ctx.train_batches(generator):
            ctx.zero_grad()
            with ctx.autocast():
                loss = self.cross_entropy(self.branch_logits(batch.inputs, branch), batch.labels)
            ctx.backward(loss)
            ctx.step()
            total += loss.detach().double()
        return float(total)

    def held_out_loss(self, branch: str) -> float:
        """L_V: per-sample mean (paper) or sum of batch means (BalanceBenchmark) over the held-out rows."""
        if self.params.variant == "paper":
            return self.mean_loss(self.step_context.holdout_batches(), branch)
        return self.batch_losses(self.step_context.holdout_batches(), branch)[0]

    def mean_loss(self, batches: Iterable[Batch], branch: str) -> float:
        """The per-sample mean cross-entropy of `branch` over `batches` (evaluation mode)."""
        _, weighted, n = self.batch_losses(batches, branch)
        return weighted / max(n, 1)

    @torch.no_grad()
    def batch_losses(self, batches: Iterable[Batch], branch: str) -> tuple[float, float, int]:
        """Over `batches` in evaluation mode: the sum of batch-mean losses, the sum of per-sample
        losses and the number of samples."""
        ctx = self.step_context
        self.eval()
        means = torch.zeros((), dtype=torch.float64, device=ctx.device)
        weighted = torch.zeros((), dtype=torch.float64, device=ctx.device)
        n = 0
        for batch in batches:
            with ctx.autocast():
                loss = self.cross_entropy(self.branch_logits(batch.inputs, branch), batch.labels)
            means += loss.double()
            weighted += loss.double() * len(batch)
            n += len(batch)
        self.train()
        return float(means), float(weighted), n

    def epoch_log(self) -> dict[str, float]:
        if not self.params.blend:
            return {}
        out = {}
        for i, k in enumerate(self.branches):
            dg, do = float(self.delta_g[i]), float(self.delta_o[i])
            out[f"delta_g.{k}"], out[f"delta_o.{k}"] = dg, do
            if dg:  # OGR = |dO / dG|, undefined where the held-out loss did not move
                out[f"ogr.{k}"] = abs(do / dg)
        return out
