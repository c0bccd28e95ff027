"""DI-MML: detached unimodal training with a shared head and DUC, then a certainty-weighted concat head.

Detached and Interactive Multimodal Learning (Fan, Xu, Wang, Liu, Guo; ACM MM 2024, arXiv
2407.19514; code github.com/fanyunfeng-bit/DI-MML).

Both stages run in one run of `stage1_epochs + stage2_epochs` (= train.epochs) epochs.

Stage 1, detached training (`main_CFT.py`). Each encoder trains on its own private head h_m, so
the modalities never compete; they interact only through a shared head h_s and, from epoch
`duc_start_epoch` on, the DUC loss:
    L = sum_m CE(h_m(f_m)) + w * sum_m CE(h_s(f_m)) + [DUC on] L_DUC
Dimension selection, once, at the start of epoch `duc_start_epoch`: per modality,
class prototypes over the training split; acc_d = the fraction of samples whose nearest prototype
along dimension d alone is their class; T_m = {d: acc_d > mean_d acc_d}. DUC is
InfoNCE on un-normalised features with the teacher detached and the batch's other samples as
negatives: on the dimensions T_1 \\ T_2 the teacher is modality 1 and the student modality 2, on
T_2 \\ T_1 the other way round. An empty dimension set contributes 0.

Stage 2 (`main_CFT_stage2.py`): encoders and private heads frozen (eval mode, BN statistics
frozen, no_grad); a concat head h_av = Linear(sum d_m, C), xavier-initialised as the code's
stage 2, is trained with CE and a fresh optimizer (`step_context.reset_optimizer()`, the code's fresh
SGD and StepLR). Prediction: z_k = the private heads' logits and h_av's; certainty
c_k = max softmax(z_k); weights = softmax_k(c_k / T) per sample; fused = sum_k w_k z_k. The
shared head is training-only. Only stage-2 epochs are selectable (the paper reports stage 2).
Logged per epoch: the stage, |T_m| and |T_t \\ T_s|, and `certainty_weight.<source>` (a modality,
or `fusion` for h_av), w_k averaged over the validation samples.

Variants: none. Only the abstract of the paper was available, and the algorithm is read from the code,
so there is no known paper-vs-code difference to switch on; everything follows the code, with
CREMA-D's settings as defaults (150 + 20 epochs, w = 1, DUC from epoch 20, tau = 50, T = 1).
`shared_head=false` and `duc=false` are the ablation switches.

Differences from the released code, and documented choices:
- Selection pass: the code iterates the training set with batch size 1, shuffled, with train-time
  augmentation, models in eval mode. Here: one unshuffled pass over the training split as the
  harness stores it (`step_context.train_batches()`), in eval mode. In eval mode BN uses its running
  statistics, so with no augmentation the batch size and order do not change the features (only
  the summation order of the prototypes).
- Empty DUC dimension set: the code's loop then computes log(B) (a constant, zero gradient); here
  0, so gradients agree and only the logged `loss.duc` differs.
- Stage 2 starts from the last stage-1 epoch's weights, which is what the code's overwritten
  stage-1 checkpoint holds; its epoch is selected on val, not best-on-test.
- Stage-1 fused logits (the code reports only the private heads in stage 1): certainty-weighted
  private heads, the stage-2 rule without h_av. They feed the logged curves only.
- M > 2 modalities: DUC runs over every ordered pair (teacher t, student s) on the dimensions
  T_t \\ T_s; for M = 2 these are exactly the code's two terms.
- h_av exists from construction (the optimizer's param groups never change) but gets no gradient
  in stage 1, and the other parameters get none in stage 2, so SGD (weight decay included) skips
  them, as the code's stage-2 optimizer over h_av alone.
- The cost report counts every encoder forward inside a step, so stage 2's frozen (no-grad,
  eval-mode) forwards count too; the selection pass at a stage start does not.
- CREMA-D's fixed-pattern frame noise `--var` belongs to the CREMA-D pipeline, not to
  the method: it is a dataset parameter.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import linear


class DIMMLParams(Strict):
    stage1_epochs: int = Field(150, ge=1)
    stage2_epochs: int = Field(20, ge=1)
    # search ranges: around the README's per-dataset values (quoted below); w is 1 in every released command
    shared_weight: float = tunable(1.0, 0.1, 10.0, log=True, ge=0)  # w
    duc: bool = True
    duc_start_epoch: int = Field(20, ge=0)  # dimensions chosen at the start of this epoch; DUC on from it
    tau: float = tunable(50.0, 5.0, 100.0, log=True, gt=0)  # DUC temperature (CREMA-D 50, AVE 10, UCF 10, ModelNet 50)
    certainty_temperature: float = tunable(1.0, 0.5, 5.0, log=True, gt=0)  # T (CREMA-D 1, AVE 3, UCF 1, ModelNet 3)
    shared_head: bool = True


# ------------------------------------------------------------------------------ building blocks


def dimension_accuracy(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """acc_d: how often the nearest class prototype along dimension d alone is the
    sample's class. Classes absent from `labels` are never the nearest."""
    counts = torch.bincount(labels, minlength=num_classes).to(feats.dtype)
    sums = feats.new_zeros(num_classes, feats.shape[1]).index_add_(0, labels, feats)
    prototypes = sums / counts[:, None]
    prototypes[counts == 0] = float("inf")
    nearest = (feats[:, None, :] - prototypes[None]).abs().argmin(dim=1)  # (N, d); ties: first class
    return (nearest == labels[:, None]).float().mean(dim=0)


def top_dimensions(accuracy: torch.Tensor) -> torch.Tensor:
    """T_m as a mask: the dimensions strictly above the mean accuracy."""
    return accuracy > accuracy.mean()


def duc_term(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of each student row against the detached teacher rows (positive: the same sample),
    on un-normalised features. 0 on an empty dimension set."""
    if student.shape[1] == 0:
        return student.new_zeros((), dtype=torch.float32)
    # float32: un-normalised dot products over hundreds of dimensions lose too much in bf16
    logits = student.float() @ teacher.detach().float().T / tau
    return F.cross_entropy(logits, torch.arange(len(student), device=student.device))


def certainty_weights(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """(B, K) weights: softmax over the K sources of each source's max class probability / T."""
    certainty = torch.stack([F.softmax(z.float(), dim=1).amax(dim=1) for z in logits], dim=1)
    return F.softmax(certainty / temperature, dim=1)


def check_config(p: DIMMLParams, setup: MethodSetup) -> None:
    total = p.stage1_epochs + p.stage2_epochs
    if total != setup.epochs:
        raise ConfigError(
            f"method.stage1_epochs ({p.stage1_epochs}) + method.stage2_epochs ({p.stage2_epochs}) = "
            f"{total} must equal train.epochs ({setup.epochs}); set train.epochs={total} or change the stages"
        )
    if setup.fusion != "concat":
        raise ConfigError(
            f"di_mml's stage-2 head is concat fusion, as in its code; model.fusion={setup.fusion!r} "
            "is not supported: set model.fusion=concat"
        )
    dims = setup.feature_dims()
    for switch, why in (("shared_head", "one shared head reads every modality"),
                        ("duc", "DUC compares dimension d across modalities")):
        if getattr(p, switch) and len(set(dims.values())) > 1:
            sizes = ", ".join(f"{m}={d}" for m, d in dims.items())
            raise ConfigError(
                f"method.{switch}=true needs every encoder to have the same out_dim ({why}); got "
                f"{sizes}: set model.encoders.<modality>.out_dim equal or method.{switch}=false"
            )
    if p.duc and p.duc_start_epoch >= p.stage1_epochs:
        raise ConfigError(
            f"method.duc_start_epoch ({p.duc_start_epoch}) must be below method.stage1_epochs "
            f"({p.stage1_epochs}), or DUC never runs; lower it or set method.duc=false"
        )


# ------------------------------------------------------------------------------------- method


@METHODS.register("di_mml")
class DIMML(Method):
    family = "objective"
    Params = DIMMLParams

    def __init__(self, params: DIMMLParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        check_config(params, setup)
        dims = setup.feature_dims()
        width, c = next(iter(dims.values())), setup.num_classes
        # the code applies no weight_init in stage 1: private and shared heads keep PyTorch's default
        self.private = nn.ModuleDict({m: nn.Linear(d, c) for m, d in dims.items()})
        self.shared = nn.Linear(width, c) if params.shared_head else None
        self.fusion = linear(sum(dims.values()), c)  # stage 2's h_av, xavier as the code's weight_init
        # buffers, so that checkpoints and resume carry the stage and the chosen dimensions; they
        # are written only by set_dimensions, start_stage2 and load_state_dict, which all refresh
        # their host copies (read_buffers)
        self.register_buffer("top", torch.zeros(len(dims), width if params.duc else 0, dtype=torch.bool))
        self.register_buffer("selected", torch.tensor(False))
        self.register_buffer("stage2", torch.tensor(False))
        self.register_load_state_dict_post_hook(DIMML.read_buffers)
        self.read_buffers()

    # ---- stages and hooks
    def read_buffers(self, *_: object) -> None:
        """Host copies of the buffers: `in_stage2`, `has_dimensions` and the DUC pairs, read here
        once per change rather than at every step, where reading a GPU tensor would make the host
        wait for it. Also nn.Module's load_state_dict post-hook (hence the ignored arguments)."""
        self.in_stage2, self.has_dimensions = bool(self.stage2), bool(self.selected)
        self.pairs = self._pairs()

    def set_dimensions(self, top: torch.Tensor) -> None:
        """T_m per modality (one row of `top` each, a mask over the feature dimensions): DUC is on."""
        self.top.copy_(top)
        self.selected.fill_(True)
        self.read_buffers()

    def start_stage2(self) -> None:
        """Freeze the encoders and private heads; from now on only h_av trains."""
        self.stage2.fill_(True)
        self.read_buffers()
        self.train(self.training)

    def train(self, mode: bool = True) -> DIMML:
        super().train(mode)
        if self.in_stage2:
            self.encoders.eval()  # stage 2: frozen encoders, BN statistics included
        return self

    def on_epoch_start(self, epoch: int) -> None:
        p = self.params
        if p.duc and epoch >= p.duc_start_epoch and not self.has_dimensions and epoch < p.stage1_epochs:
            self.select_dimensions()
        if epoch >= p.stage1_epochs and not self.in_stage2:
            self.start_stage2()
            self.step_context.reset_optimizer()  # a fresh SGD and schedule, as the code's stage-2 script

    def selectable(self, epoch: int) -> bool:
        return epoch >= self.params.stage1_epochs

    @torch.no_grad()
    def select_dimensions(self) -> None:
        """T_m for every modality, from one eval-mode pass over the training split."""
        ctx, was_training = self.step_context, self.training
        self.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.modality_names}
        labels = []
        for batch in ctx.train_batches():
            with ctx.autocast():
                out = self.encode(batch.inputs)
            for m in self.modality_names:
                feats[m].append(out[m].float())
            labels.append(batch.labels)
        y = torch.cat(labels)
        self.set_dimensions(torch.stack([top_dimensions(dimension_accuracy(torch.cat(feats[m]), y, self.num_classes))
                                         for m in self.modality_names]))
        self.train(was_training)

    def duc_pairs(self) -> list[tuple[str, str, torch.Tensor]]:
        """(teacher, student, dimensions T_t \\ T_s) for every ordered pair of modalities."""
        return self.pairs

    def _pairs(self) -> list[tuple[str, str, torch.Tensor]]:
        names = self.modality_names
        return [(names[t], names[s], (self.top[t] & ~self.top[s]).nonzero().squeeze(1))
                for t, s in itertools.permutations(range(len(names)), 2)]

    def duc_loss(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = [duc_term(feats[s][:, dims], feats[t][:, dims], self.params.tau) for t, s, dims in self.duc_pairs()]
        return torch.stack(terms).sum()

    # ---- training
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.in_stage2:
            return self.fusion_step(batch)
        ctx = self.step_context
        ctx.zero_grad()
        y = batch.labels
        zero = torch.zeros((), device=y.device)
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            private = sum(self.cross_entropy(self.private[m](f), y) for m, f in feats.items())
            shared = (sum(self.cross_entropy(self.shared(f), y) for f in feats.values())
                      if self.shared is not None else zero)
            duc = self.duc_loss(feats) if self.has_dimensions else zero
            loss = private + self.params.shared_weight * shared + duc
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "loss.private": private.detach(), "loss.shared": shared.detach(),
                "loss.duc": duc.detach()}

    def fusion_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Stage 2: only h_av learns, on features of the frozen encoders."""
        ctx = self.step_context
        ctx.zero_grad()
        with ctx.autocast():
            with torch.no_grad():
                feats = self.encode(batch.inputs)
            loss = self.cross_entropy(self.fuse(feats), batch.labels)
        ctx.backward(loss)
        ctx.step()
        return {"loss": loss.detach(), "loss.fusion": loss.detach()}

    def fuse(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(torch.cat([feats[m] for m in self.modality_names], dim=1))

    # ---- prediction
    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        per_modality = {m: self.private[m](f) for m, f in feats.items()}
        sources = {**per_modality, **({"fusion": self.fuse(feats)} if self.in_stage2 else {})}
        weights = certainty_weights(list(sources.values()), self.params.certainty_temperature)
        fused = sum(weights[:, k, None] * z.float() for k, z in enumerate(sources.values()))
        # each source's mean weight over the batch; the harness averages them over the split
        logs = {f"certainty_weight.{name}": weights[:, k].detach().mean() for k, name in enumerate(sources)}
        return Prediction(fused, per_modality, logs)

    def epoch_log(self) -> dict[str, float | int]:
        log: dict[str, float | int] = {"stage": 2 if self.in_stage2 else 1}
        if self.has_dimensions:
            for i, m in enumerate(self.modality_names):
                log[f"dims.{m}"] = int(self.top[i].sum())
            for t, s, dims in self.duc_pairs():
                log[f"dims.{t}->{s}"] = len(dims)
        return log
