"""Data Remixing (Ma, Chen & Deng, ICML 2025, "Improving Multimodal Learning Balance and Sufficiency
through Data Remixing", arXiv 2506.11550), as its release computes it.

The release: github.com/MatthewMaxy/Remix_ICML2025 @ 80898aa (train.py, lines cited as T:<line>;
models/models.py `AVClassifier`, M:<line>; scripts/run_train.sh). BalanceBenchmark has no Remix
trainer (GeWu-Lab/BalanceBenchmark @ 4c1482f), so the release is the one reference. The paper's
text beyond its abstract could not be read where this file was written; everything below is the
release's, and where the suite departs from it, it says so.

The model (M:29-67): the encoders, a fusion head on their features (the release's: concat) and a
private linear head per modality on its encoder's features (`head_audio`, `head_video`); `predict`
gives the fused head's logits and the private heads' as the per-modality view (T:176-201 evaluates
the fused output).

1. Warm-up (epochs < `warmup`, T:101-125, 243-245): every batch whole,
       L = CE(fused, y) + alpha * sum_m CE(head_m(f_m), y)
   (the release's alpha and beta, 0.5 each, T:43-44; the sum in the dataset's modality order).
2. Decoupling (every later epoch, T:60-99, 248): each training sample goes to ONE modality, the one
   whose private head is least confident on it, confidence being the KL divergence of the head's
   softmax from the uniform distribution, in bits, the probabilities clipped to [1e-9, 1] (T:52-57);
   ties go to the later modality (the release's `KL_audio < KL_video`, T:78; for M >= 3 the last of
   the least confident ones). The scores come from the model as it was when the epoch started, in
   evaluation mode and without gradient (T:64-65).
3. Reassembly (T:127-173): the samples of each modality are trained in batches of that modality
   only, the other modalities' features zeroed after their encoders (M:55-59, in place there: the
   zeroed encoders still run forward and receive zero gradients, so weight decay and momentum move
   them as in the release), each batch's loss
       L = CE(fused, y) + gamma * CE(head_m(f_m), y)
   (gamma1, gamma2 = 1, T:45-46); the other modalities' private heads are not in the loss.

How the suite forms the epochs, and where it departs from the release:
- The release re-samples the dataset once an epoch: it writes each modality's samples to a CSV,
  builds a loader per modality and trains ALL of one modality's batches (video first), then all of
  the other's. The suite's harness hands a method its own batches (the epoch's shuffled training
  batches) one step at a time, so the decoupling is done per step: each batch is scored by the
  epoch-start model (its parameters and buffers, snapshotted when the epoch starts, run through
  torch.func.functional_call) and its samples are queued by
  modality; whenever a modality's queue holds a training batch's worth (the epoch's first batch
  size), those samples take one step; at the epoch's last batch every queue is emptied, a smaller
  batch each (as the release's loaders end an epoch, drop_last off). Each modality's batches are
  thus consecutive runs of its samples in the epoch's random order -- the release's shuffled
  per-modality loaders, batch for batch in distribution -- and an epoch takes
  sum_m ceil(N_m / B) steps, as the release's does. What differs: the steps of the modalities
  interleave as their queues fill (the release: one modality's whole subset, then the other's),
  the scores are taken on the step's training views (the release scores test-time views: no
  random crop or frame choice; the same for data without augmentation), and with
  `train.drop_last` the harness's dropped rows are not remixed either. The same batches for any
  number of loader workers and an exact resume follow from the harness's: the queues are empty
  and the snapshot is taken again at every epoch start, where the harness resumes.
- The release hard-codes 6 classes in the KL (T:76-77, CREMA-D's): that shifts both modalities'
  KL by the same constant, so the assignment is unchanged; the reported confidence uses the
  dataset's number of classes.
- Initialisation: the private heads are initialised as the suite's fusion heads are (xavier-normal
  weights, zero bias, models/fusion.py); the release keeps nn.Linear's default for every head.
- Fusion: any `model.fusion` (zeroed features are defined for every head); the release's is concat.

Switches: `remix: false` trains every epoch as the warm-up (the release's baseline.py); with
`alpha: 0` as well it is joint training (tested). The release's run (scripts/run_train.sh): warm-up
10 of 60 epochs, Adam 5e-5, StepLR(30, 0.1), batch 64.

Each step reports `loss` (in warm-up: the batch's loss; when remixing: the sum of the steps' losses
weighted by their sizes, divided by the batch's size, so that the epoch's mean is the sample mean
of what was optimised), in warm-up `loss.fused` and `loss.<m>`; when remixing, `share.<m>` (the
batch's fraction assigned to m; the epoch mean is m's share of the epoch) and `confidence.<m>` (the
batch's mean KL from uniform, in bits, of m's head at the epoch start); `remixed` (1 when remixing).
Cost: a warm-up step is joint's plus the private heads. A remixed batch costs one evaluation-mode
forward pass of every encoder (the scores; the release's pass over train at the epoch start, the
same count) and, per step taken, one forward and one backward pass of every encoder: about
sum_m ceil(N_m / B) / ceil(N / B) (~1 for two modalities) steps per batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from pydantic import Field
from torch.func import functional_call

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion, linear

CLIP = 1e-9  # the release's floor on the probabilities before the logarithm (T:54)


class RemixParams(Strict):
    # epochs of whole-batch training before the first decoupling (train.py --warmup, 10 of 60)
    warmup: int = Field(10, ge=0)
    # warm-up weight of each modality's private-head loss (the release's alpha and beta, 0.5 in its argparse and
    # run_train.sh; the search range spans a factor 5 either side, as gamma's)
    alpha: float = tunable(0.5, 0.1, 2.5, log=True, ge=0)
    # weight of the trained modality's private-head loss in a remixed step (gamma1, gamma2: 1 in the release)
    gamma: float = tunable(1.0, 0.2, 5.0, log=True, ge=0)
    # False: every epoch is a warm-up epoch (the release's baseline.py)
    remix: bool = True


# --------------------------------------------------------- decoupling and reassembly (pure functions)


def confidence(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per sample, KL(softmax(logits) || uniform) in bits, the probabilities clipped to [1e-9, 1]
    (T:52-57; in float64, as numpy computes it from the float32 probabilities)."""
    p = torch.softmax(logits.float(), dim=1).double().clamp(CLIP, 1.0)
    return (p * torch.log2(p / (1.0 / num_classes))).sum(dim=1)


def assignment(confidences: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sample, the index (in the dict's order) of the least confident modality; ties go to the
    later one (T:78: audio only where its KL is strictly lower)."""
    stacked = torch.stack(list(confidences.values()), dim=1).flip(1)  # the last of equal minima first
    return stacked.shape[1] - 1 - stacked.argmin(dim=1)


def zero_others(feats: dict[str, torch.Tensor], keep: str) -> dict[str, torch.Tensor]:
    """The features with every modality but `keep` zeroed, still in the graph: their encoders get
    zero gradients, as the release's in-place `a[:, :] = 0.0` gives them (M:55-59)."""
    return {m: f if m == keep else f.masked_fill(torch.ones((), dtype=torch.bool, device=f.device), 0.0)
            for m, f in feats.items()}


@dataclass
class Queue:
    """Samples waiting for a step of one modality, in the order they came."""

    parts: list[Batch] = field(default_factory=list)
    size: int = 0

    def put(self, batch: Batch) -> None:
        if len(batch):
            self.parts.append(batch)
            self.size += len(batch)

    def take(self, n: int) -> Batch:
        """The first n samples (all of them if fewer), removed from the queue."""
        whole = Batch.cat(self.parts)
        n = min(n, len(whole))
        taken = whole.rows(torch.arange(n, device=whole.labels.device))
        rest = whole.rows(torch.arange(n, len(whole), device=whole.labels.device))
        self.parts, self.size = ([rest] if len(rest) else []), len(rest)
        return taken


# ------------------------------------------------------------------------------------ the method


@METHODS.register("remix")
class Remix(Method):
    # BalanceBenchmark's taxonomy (its method table, spec/peers.md 1.6): methods that act on which
    # samples train what, as its sample-level valuation does, are its "Data" family
    family = "data"
    Params = RemixParams

    def __init__(self, params: RemixParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if params.remix and params.warmup >= setup.epochs:
            raise ConfigError(
                f"method.warmup={params.warmup} leaves no remixed epoch in train.epochs={setup.epochs}: "
                "lower it (the release warms up 10 of 60 epochs) or set method.remix=false (the warm-up "
                "throughout, the release's baseline)")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        # built after the fusion, so that encoders and fusion start as joint training's
        self.heads = nn.ModuleDict({m: linear(d, setup.num_classes) for m, d in setup.feature_dims().items()})
        self.start_epoch()

    def start_epoch(self) -> None:
        # per-epoch host state; the harness resumes at epoch starts, where it is rebuilt
        self.snapshot: dict[str, torch.Tensor] = {}
        self.queues = {m: Queue() for m in self.modality_names}
        self.batch_size = 0

    def remixing(self, epoch: int) -> bool:
        return self.params.remix and epoch >= self.params.warmup

    def on_epoch_start(self, epoch: int) -> None:
        self.start_epoch()
        if self.remixing(epoch):
            self.snapshot = {k: t.detach().clone()
                             for k, t in itertools.chain(self.named_parameters(), self.named_buffers())}

    # ---- logits
    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The private heads' logits (what the decoupling scores, through functional_call)."""
        feats = self.encode(inputs)
        return {m: self.heads[m](feats[m]) for m in self.modality_names}

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), {m: self.heads[m](feats[m]) for m in self.modality_names})

    # ---- the steps
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.remixing(self.step_context.epoch):
            return self.remixed_step(batch)
        return self.warmup_step(batch)

    def warmup_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels = self.step_context, batch.labels
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            fused = self.cross_entropy(self.fusion(feats), labels)
            unimodal = {m: self.cross_entropy(self.heads[m](feats[m]), labels) for m in self.modality_names}
            loss = fused + sum(self.params.alpha * u for u in unimodal.values())
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "loss.fused": fused.detach(),
                **{f"loss.{m}": u.detach() for m, u in unimodal.items()}, "remixed": torch.zeros(())}

    def remixed_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx = self.step_context
        if not self.batch_size:  # the epoch's first batch: the training batch size
            self.batch_size = len(batch)
        scores = self.scores(batch)
        chosen = assignment(scores)
        for k, m in enumerate(self.modality_names):
            self.queues[m].put(batch.rows((chosen == k).nonzero().squeeze(1)))
        last = ctx.batch_index == ctx.num_batches - 1
        total = torch.zeros((), device=batch.labels.device)
        for m, queue in self.queues.items():
            while queue.size >= self.batch_size or (last and queue.size):
                part = queue.take(self.batch_size)
                total = total + self.unimodal_step(part, m) * len(part)
        out = {"loss": total / len(batch), "remixed": torch.ones(())}
        for k, m in enumerate(self.modality_names):
            out[f"share.{m}"] = (chosen == k).float().mean()
            out[f"confidence.{m}"] = scores[m].mean().float()
        return out

    @torch.no_grad()
    def scores(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per sample and modality, the confidence of the epoch-start model's private head
        (evaluation mode, as the release's pass over train at the epoch start)."""
        was = self.training
        self.eval()
        try:
            with self.step_context.autocast():
                logits = functional_call(self, self.snapshot, (batch.inputs,))
        finally:
            self.train(was)
        return {m: confidence(z, self.num_classes) for m, z in logits.items()}

    def unimodal_step(self, batch: Batch, modality: str) -> torch.Tensor:
        """One step on `modality`'s samples, the others' features zeroed (T:139-150, 158-169)."""
        ctx, labels = self.step_context, batch.labels
        ctx.zero_grad()
        with ctx.autocast():
            feats = zero_others(self.encode(batch.inputs), modality)
            loss = (self.cross_entropy(self.fusion(feats), labels)
                    + self.params.gamma * self.cross_entropy(self.heads[modality](feats[modality]), labels))
        ctx.backward(loss)
        ctx.step()
        return loss.detach()
