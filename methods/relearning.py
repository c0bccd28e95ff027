"""Diagnosing & Re-learning (Wei, Li, Feng & Hu, ECCV 2024, arXiv 2407.09705).

Joint training (one fused cross-entropy, one backward, one step per batch), plus, at a few epoch
boundaries, a diagnosis of each encoder's learning state and a soft re-initialisation of the
encoder by that state. Released code: GeWu-Lab/Diagnosing_Relearning_ECCV2024 @ 025085e,
`code/ours.py` (lines cited as R:<line>) and `code/script/ours.sh`; second reference:
BalanceBenchmark @ 4c1482f, `balancemm/trainer/ReLearning_trainer.py` (B:<line>) with its
`configs/trainer_config.yaml` (ReLearning: move_lambda 3, reinit_epoch 15, reinit_num 2).

Per step: joint training's step, unchanged (R:172-213; B:379-397 within its always-open window).

The diagnosis (R:99-135, 300-324; B:67-119), after the training of epoch e, for each modality m:
1. the features f_m of every sample of the training split and of the validation split, from the
   encoder alone, in eval mode (BatchNorm's running statistics), without gradients (R:300-324);
2. per split, the features min-max scaled to [-1, 1] column by column (sklearn's MinMaxScaler,
   fitted on that split), clustered by k-means into C clusters, C the number of classes
   (sklearn KMeans, random_state 0, R:108-110), and the purity of the clustering against the
   labels: P = (1/n) sum over clusters of the count of its most frequent class (purity_score,
   R:63-95, here from the contingency matrix: the same number);
3. the purity gap g_m = |P_m,train - P_m,val| (R:122-123) and the re-initialisation strength
   alpha_m = tanh(move_lambda g_m) (R:126-127).
A modality whose training-split clusters are much purer than its held-out ones has learnt its
training data past what generalises, and is pulled back the most.

The re-initialisation (R:139-169; B:122-134): every parameter theta of encoder m becomes
alpha_m theta_init + (1 - alpha_m) theta, theta_init the encoder's weights before the first step
(R:345-350 saves them once, at the start). BatchNorm's running statistics (buffers) and the
optimizer's state (momentum) are left as they are, as in both references; heads are untouched.

The schedule (R:418-427; B:190-201): after epoch e (0-based) with e > 0 and e % reinit_epoch == 0,
for the first reinit_num such epochs. ours.sh: reinit_epoch 20, reinit_num 3, over 90 epochs
(after epochs 20, 40, 60).

Variants (`variant`), where the two references differ (each transcribed in tests/test_relearning.py):
- "release" (default): the diagnosis and re-initialisation after epoch e come after that epoch's
  evaluation (R:386 evaluates, R:418-427 re-initialises), so here they run at the start of epoch
  e + 1 (`on_epoch_start`): epoch e is evaluated and selected with the weights it trained to. A
  schedule epoch that is the run's last is therefore never applied (in the code it comes after
  the last evaluation: no effect on anything). Defaults reinit_epoch 20, reinit_num 3 (ours.sh).
- "balancebenchmark": re-initialises before the validation of epoch e (B:187-201, val at
  B:244-247), here in `on_epoch_end`, so epoch e is evaluated with the re-initialised weights.
  Defaults reinit_epoch 15, reinit_num 2 (its trainer_config.yaml).
The two follow the same parameter trajectory; they differ in which weights epoch e's evaluation
(and so the selection, and the reported numbers) sees.

Paper vs code: the paper's diagnosis (purity gap g = |P_D - P_V| on training and validation
representations, strength tanh(lambda g)) and re-initialisation ((1 - alpha) theta_current +
alpha theta_init) are the code's, as far as its text could be read (summaries of arXiv
2407.09705; its tables and its schedule could not be), so there is no paper variant.

The validation split shapes training here, as it does in the release: the release carves its
val.csv out of OGM-GE's CREMA-D training list (my_train = train - val) and diagnoses on it, as
the suite's own validation split is carved from train. The suite also selects epochs on it.

Departures and documented choices:
- The training split is diagnosed in its stored order (`step_context.train_batches()`); the
  release iterates its shuffled training loader (R:358-359, 423), a fresh order each time. Only
  k-means depends on the order (k-means++ seeding with random_state 0 picks by position).
- The training-split view is the one the encoders train on (the suite's training view, with its
  augmentation), as in both references (the release trains and diagnoses on `my_train`, which its
  loader reads without augmentation; BalanceBenchmark diagnoses on its training loader).
- `kmeans_n_init` (default 1): both references call KMeans with sklearn's default n_init, which
  is 1 ("auto", k-means++) from sklearn 1.4 on (BalanceBenchmark pins 1.4.2) and was 10 before;
  the release pins no version. 10 reproduces an older sklearn.
- The diagnosis passes leave the global RNG as they found it (torch.random.fork_rng), so that
  with move_lambda 0 (alpha 0) a run is joint training's exactly.
- M >= 3: every encoder is diagnosed and re-initialised on its own (BalanceBenchmark's loop over
  its modalities; the release names audio and visual). One modality is refused.

Reported: per step joint's `loss`. Per epoch (`epoch_log`, the report's diagnostics figure):
`reinit.<m>`, the alpha_m applied in this epoch's hooks (0 in the other epochs), and, in an
epoch whose hooks diagnosed, `purity_train.<m>` and `purity_val.<m>` (for "release" the epoch
after the one diagnosed, whose start the re-initialisation precedes). Cost: per step, one forward
and one backward pass, as joint training; per diagnosis, one eval-mode forward of every encoder
over the training and validation splits and 2M k-means fits, outside the per-step pass counts.
The initial weights are kept as buffers (one more copy of the encoders, in the checkpoints too),
so that a resumed run re-initialises towards its own initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams

# (reinit_epoch, reinit_num) by variant: ours.sh; BalanceBenchmark's configs/trainer_config.yaml
SCHEDULE_DEFAULTS = {"release": (20, 3), "balancebenchmark": (15, 2)}


class RelearningParams(JointParams):
    move_lambda: float = tunable(3.0, 0.5, 10.0, log=True, ge=0)  # R:53-54 and ours.sh; BalanceBenchmark's too
    reinit_epoch: int | None = Field(None, ge=1)  # None: the variant's (release 20, balancebenchmark 15)
    reinit_num: int | None = Field(None, ge=0)  # None: the variant's (release 3, balancebenchmark 2)
    kmeans_n_init: int = Field(1, ge=1)  # sklearn >= 1.4's default for k-means++ (see the docstring)
    variant: Literal["release", "balancebenchmark"] = "release"


# ------------------------------------------------------------------------- the math (pure)


def diagnosis_epochs(every: int, count: int, epochs: int) -> list[int]:
    """The epochs e (0-based) after whose training the encoders are diagnosed: e > 0 with
    e % every == 0, the first `count` of them, below `epochs` (R:418-420)."""
    return list(range(every, epochs, every))[:count]


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The fraction of samples whose class is their cluster's most frequent one (R:63-95)."""
    from sklearn.metrics.cluster import contingency_matrix  # imported when used: `list` stays light

    return float(contingency_matrix(labels, clusters).max(axis=0).sum() / len(labels))


def cluster_purity(features: np.ndarray, labels: np.ndarray, n_clusters: int, n_init: int) -> float:
    """Purity of k-means (random_state 0) on the features min-max scaled to [-1, 1] (R:108-115)."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    scaled = MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    clusters = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=0).fit_predict(scaled)
    return purity(labels, clusters)


def reinit_strength(train_purity: float, val_purity: float, move_lambda: float) -> float:
    """alpha = tanh(move_lambda |P_train - P_val|) (R:122-127)."""
    return math.tanh(move_lambda * abs(train_purity - val_purity))


@torch.no_grad()
def soft_reinit_(module: nn.Module, initial: dict[str, torch.Tensor], alpha: float) -> None:
    """Every parameter theta of `module` becomes alpha theta_init + (1 - alpha) theta, in place
    (R:156-166: the same Parameter objects, so the optimizer's state stays attached)."""
    for name, p in module.named_parameters():
        p.copy_(alpha * initial[name] + (1 - alpha) * p)


class InitialWeights(nn.Module):
    """A module's parameters as they are when this is built, as buffers: saved with the
    checkpoints and moved with the method (buffer names cannot hold dots: '/' stands for them)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, p in module.named_parameters():
            self.register_buffer(name.replace(".", "/"), p.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name.replace("/", "."): t for name, t in self.named_buffers()}


# ------------------------------------------------------------------------------- the method


@METHODS.register("relearning")
class Relearning(Joint):
    Params = RelearningParams
    family = "optimisation"  # BalanceBenchmark's taxonomy (it re-initialises what the updates learnt)

    def __init__(self, params: RelearningParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method relearning balances two or more modalities; the dataset has {len(names)} "
                              f"({', '.join(names)}): use method.name=unimodal or joint")
        every, count = SCHEDULE_DEFAULTS[params.variant]
        self.every = params.reinit_epoch or every
        self.count = count if params.reinit_num is None else params.reinit_num
        # "release" applies the diagnosis of epoch e at the start of e + 1: never after the last epoch
        last = setup.epochs - 1 if params.variant == "release" else setup.epochs
        self.schedule = diagnosis_epochs(self.every, self.count, last)
        if self.count > 0 and not self.schedule:
            raise ConfigError(
                f"method relearning (variant {params.variant}) re-initialises after epoch {self.every} "
                f"(reinit_epoch, 0-based), which a run of train.epochs={setup.epochs} "
                f"{'never follows with another epoch' if params.variant == 'release' else 'never reaches'}: "
                "lower method.reinit_epoch, or set method.reinit_num=0 for joint training")
        self.initial = nn.ModuleDict({m: InitialWeights(self.encoders[m]) for m in names})
        # the latest diagnosis (host numbers) and the epoch whose hooks made it, for epoch_log
        self.diagnosis: dict[str, float] = {}
        self.diagnosed_in: int | None = None

    # ---- the hooks
    def on_epoch_start(self, epoch: int) -> None:
        if self.params.variant == "release" and epoch - 1 in self.schedule:
            self.relearn(epoch)

    def on_epoch_end(self, epoch: int) -> None:
        if self.params.variant == "balancebenchmark" and epoch in self.schedule:
            self.relearn(epoch)

    def relearn(self, epoch: int) -> None:
        """Diagnose every encoder on the training and validation splits, then re-initialise each
        by its strength; `epoch` is the one whose hook runs this."""
        ctx, p = self.step_context, self.params
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the passes may draw loader seeds
            train_feats, train_labels = self.unimodal_features(ctx.train_batches(), "training")
            val_feats, val_labels = self.unimodal_features(ctx.val_batches(), "validation")
        log = {}
        for m in self.modality_names:
            p_train = cluster_purity(train_feats[m], train_labels, self.num_classes, p.kmeans_n_init)
            p_val = cluster_purity(val_feats[m], val_labels, self.num_classes, p.kmeans_n_init)
            log.update({f"purity_train.{m}": p_train, f"purity_val.{m}": p_val,
                        f"reinit.{m}": reinit_strength(p_train, p_val, p.move_lambda)})
        for m in self.modality_names:  # after every diagnosis, as R:426-427
            soft_reinit_(self.encoders[m], self.initial[m].tensors(), log[f"reinit.{m}"])
        self.diagnosis, self.diagnosed_in = log, epoch

    @torch.no_grad()
    def unimodal_features(self, batches: Iterable[Batch], split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Each encoder's eval-mode features of a whole split (float32, as the code's), and the labels."""
        was_training = self.training
        self.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.modality_names}
        labels = []
        for batch in batches:
            with self.step_context.autocast():
                out = self.encode(batch.inputs)
            for m in self.modality_names:
                feats[m].append(out[m].float().flatten(1).cpu())
            labels.append(batch.labels.cpu())
        self.train(was_training)
        n = sum(len(y) for y in labels)
        if n < self.num_classes:
            raise ConfigError(f"method relearning clusters each split's features into as many clusters as classes "
                              f"({self.num_classes}); the {split} split has {n} samples")
        return {m: torch.cat(f).numpy() for m, f in feats.items()}, torch.cat(labels).numpy()

    def epoch_log(self) -> dict[str, Any]:
        log = {f"reinit.{m}": 0.0 for m in self.modality_names}
        if self.diagnosed_in == self.step_context.epoch:
            log.update(self.diagnosis)
        return log
