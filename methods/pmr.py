"""PMR: prototypical modal rebalance (Fan, Xu, Wang, Liu, Guo; CVPR 2023, arXiv 2211.07089).

Joint training (the fused task loss, one backward, one step) plus class prototypes per modality
that (1) measure each modality's pace without the fusion head and (2) pull the slow modality's
features towards them. Released code: github.com/fanyunfeng-bit/Modal-Imbalance-PMR, commit
3615e48, `main_Prototype_grad.py` (lines cited as R:<line>); second reference: BalanceBenchmark's
`balancemm/trainer/PMR_trainer.py`, commit 4c1482f (B:<line>).

Per step (R:120-271, B:107-199):
1. features f_m = encoder_m(x_m), task loss L_task as joint training (fusion and `late_loss` are
   joint's: PMR works on features only, whatever the head).
2. prototype logits z_m = -||f_m - c_m,k||_2 over the classes k (R:69-75, 152-153: the code's
   double loop; here torch.cdist without the matrix-product shortcut, same values, and a zero
   gradient rather than NaN where a feature sits exactly on its prototype).
3. scores s_m = sum over the batch of softmax(z_m)[y] (R:158-159), ratios r (below),
   PCE_m = CE(z_m, y) (R:166-167).
4. inside the window `modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based, R:156):
   L = L_task + sum_m w_m PCE_m with w_m = alpha for a slow modality (r_m < 1), else 0
   (R:169-178: ratio_a_p = s_a / s_v > 1 -> the visual PCE gets alpha, < 1 -> the audio one,
   = 1 -> neither). Outside it L = L_task (R:181-182).
   Ratios: for two modalities r_first = s_first / s_last and r_last = 1 / r_first, so that the rule
   is the code's bit for bit. For M >= 3 (the code defines two modalities; this is the suite's
   extension) r_m = s_m / max of the others' s: every modality behind the leader gets alpha.

Prototypes (R:383-441, B:200-251): per modality the class means of the encoders' features, in
eval mode, without gradients, over a subset of the training split; then an EMA
c <- (1 - momentum_coef) c_new + momentum_coef c_old. They are computed before epoch 0 (R:534-539,
`on_epoch_start(0)`) and after every training epoch (R:551-557, `on_epoch_end`), so the
evaluation of an epoch uses the prototypes of the next one, as the code's `valid` does.

Variants (`variant`), where the two references differ:
- "release" (default): the EMA is skipped at the end of epoch 0 (the code's `epoch <= 0` test,
  R:435, is called with the epoch just trained), so the EMA chain starts from the prototypes after
  epoch 0; the initial ones are discarded. M >= 3: the extension above.
- "balancebenchmark": BalanceBenchmark recomputes at every epoch start with `current_epoch <= 0`
  (B:61-65, 241-248), so the EMA runs from epoch 1 on and the initial prototypes enter it. For two
  modalities the step is the release's (B:147-176). For M >= 3 it drops the PCE and modulates the
  encoders' gradients instead (B:150-153, 177-192): r_m = s_m / min_j s_j, k_m = 1 - tanh(eta r_m)
  if r_m > 1 else 1, and every non-1-D gradient g of encoder m becomes g k_m - N(0, sigma^2),
  sigma = std(g) (before scaling, unbiased) + 1e-8, element-wise, for every modality (k = 1
  included). Parameters are selected by module membership, not by the code's `modality in name`.

Paper vs code: the paper adds a prototypical entropy regularisation (PER) of the dominant
modality during early training (abstract; "to prevent premature convergence"). The released code
has none (its issues #4, #7 and #9 ask where it is; no answer), nor has BalanceBenchmark, so the
default (`entropy_weight` 0) has none. The paper's equations could not be read (the PDF was not
reachable), so `entropy_weight` mu > 0 implements the abstract's description, and its exact form
is unverified: for epochs <= `entropy_ends`, L -= mu * mean_i H(softmax(z_m,i)) for the dominant
modality (r_m > 1), raising the entropy of its prototype predictions. The paper's coefficient
(a constant alpha, as in the code, or a function of the ratio) is likewise unverified; the code's
constant is used.

Departures from the code, and documented choices:
- The subset: the code takes the first len(loader) // 10 batches of the SHUFFLED training loader
  (R:425-430; B:231-234), i.e. a random ~10%. The suite's public pass over the training split
  (`step_context.train_batches()`) is unshuffled, so each sample is kept with probability
  `proto_fraction` (default 0.1) drawn from a generator seeded by the run's seed and the
  computation's index (resume-exact, and the global RNG is left alone), plus the first sample of
  every class not yet seen in the pass, so that no class is left without a prototype (the code
  divides by a zero count, NaN, when a class misses its subset). The whole split is loaded, and
  only the kept samples are encoded.
- AVE and CG-MNIST: the code computes prototypes on the validation split (R:534-537, 551-555;
  CG-MNIST's "val" is its test set) over all of it. The suite always uses the training split:
  selection data never shape training. The AVE recipe sets proto_fraction 1.0.
- The code's train-mode views (random crops) feed its prototype pass; so do the suite's
  (`train_batches()` is the augmented training view).

Each step reports `loss` (the total), `loss_task`, `pce.<m>`, `ratio.<m>`, `pce_weight.<m>`
(or, for balancebenchmark with M >= 3, `grad_coef.<m>`), `entropy.<m>` with PER on, and
`modulated`. Evaluation logs `proto_acc.<m>`, the nearest-prototype accuracy (the code's
acc_a_p / acc_v_p). Cost per step: one forward and one backward as joint training; per epoch an
eval-mode forward of the kept subset (~10% of the training split) and a load of all of it, which
the harness's per-step pass counts leave out (they count training-mode forwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import MethodSetup
from mmbalance.methods.joint import Joint, JointParams
from mmbalance.methods.ogm_ge import ground_truth_scores

NOISE_EPS = 1e-8  # BalanceBenchmark's addition to the noise std (B:192)
BB_ETA = 0.01  # BalanceBenchmark's configs/trainer_config.yaml PMR.eta


class PMRParams(JointParams, Window):
    # the code's argparse defaults (R:39-49); its bash.sh runs use alpha 2.0 and momentum_coef 0.0
    alpha: float = tunable(1.0, 0.1, 5.0, log=True, ge=0)
    momentum_coef: float = tunable(0.2, 0.0, 0.9, ge=0, le=1)
    modulation_ends: int = Field(100, ge=0)
    proto_fraction: float = Field(0.1, gt=0, le=1)
    variant: Literal["release", "balancebenchmark"] = "release"
    eta: float | None = Field(None, ge=0)  # balancebenchmark with M >= 3 only; None: 0.01
    entropy_weight: float = Field(0.0, ge=0)  # mu of the paper's PER; 0: the code (no PER)
    entropy_ends: int | None = Field(None, ge=0)  # last epoch (inclusive) with PER on

    @model_validator(mode="after")
    def _consistent(self) -> PMRParams:
        if self.eta is not None and self.variant != "balancebenchmark":
            raise ValueError("eta applies only to variant='balancebenchmark' with three or more modalities; "
                             "remove it or set method.variant=balancebenchmark")
        if self.entropy_weight > 0 and self.entropy_ends is None:
            raise ValueError("entropy_weight > 0 (the paper's PER) needs entropy_ends, the last epoch "
                             "(inclusive, 0-based) of its early stage: the paper's value is not recovered")
        if self.entropy_weight == 0 and self.entropy_ends is not None:
            raise ValueError("entropy_ends applies only with entropy_weight > 0; remove it or set "
                             "method.entropy_weight")
        if self.entropy_weight > 0 and self.variant != "release":
            raise ValueError("entropy_weight (the paper's PER) is in neither reference; it applies only to "
                             "variant='release'")
        return self


# ------------------------------------------------------------------------- the math (pure)


def prototype_logits(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-Euclidean distance of each feature (B x D) to each class prototype (C x D): B x C."""
    return -torch.cdist(feats.float(), prototypes, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_prototype_accuracy(feats: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (prototype_logits(feats, prototypes).argmax(1) == labels).float().mean()


def pace_ratios(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """r_m: < 1 for a modality behind the leader, > 1 for the leader. Two modalities: the code's
    s_first / s_last and its inverse; M >= 3: s_m / max of the others' scores."""
    names = list(scores)
    if len(names) == 2:
        first, last = names
        ratio = scores[first] / scores[last]
        return {first: ratio, last: 1 / ratio}
    return {m: scores[m] / torch.stack([scores[o] for o in names if o != m]).max() for m in names}


def pce_weights(ratios: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """alpha for every slow modality (r < 1), 0 otherwise (0-d tensors: no host sync)."""
    return {m: torch.where(r < 1, alpha, 0.0).to(r.dtype) for m, r in ratios.items()}


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of the entropy of softmax(logits) over the classes."""
    return -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()


def balancebenchmark_coefficients(scores: dict[str, torch.Tensor], eta: float
                                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """BalanceBenchmark's M >= 3 rule (B:150-153, 180-185): r_m = s_m / min s, k_m = 1 - tanh(eta r_m)
    for r_m > 1, else 1. Returns (ratios, coefficients)."""
    low = torch.stack(list(scores.values())).min()
    ratios = {m: s / low for m, s in scores.items()}
    return ratios, {m: torch.where(r > 1, 1 - torch.tanh(eta * r), torch.ones_like(r)) for m, r in ratios.items()}


@torch.no_grad()
def modulate_gradients_(tensors: dict[str, Sequence[nn.Parameter]], coefs: dict[str, torch.Tensor]) -> None:
    """g <- g k_m - N(0, (std(g) + 1e-8)^2) for every tensor of modality m (B:187-192), in place;
    the noise comes from the global RNG, modality by modality, tensor by tensor."""
    for m, params in tensors.items():
        for p in params:
            g = p.grad
            if g is None:
                continue
            sigma = (g.std() if g.numel() > 1 else torch.zeros((), device=g.device)) + NOISE_EPS
            g.mul_(coefs[m]).sub_(torch.randn_like(g).mul_(sigma))


def subset_mask(labels: torch.Tensor, seen: torch.Tensor, fraction: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(which samples of this batch to keep, the classes seen so far in the pass). Each sample is
    kept with probability `fraction`, and the first one of every class not seen before is kept
    whatever its draw. CPU tensors; `seen` is a bool vector over the classes."""
    n = len(labels)
    keep = torch.ones(n, dtype=torch.bool) if fraction >= 1 else torch.rand(n, generator=generator) < fraction
    first = torch.full_like(seen, n, dtype=torch.long).scatter_reduce(0, labels, torch.arange(n), "amin")
    present = first < n
    keep[first[present & ~seen]] = True
    return keep, seen | present


# ------------------------------------------------------------------------------- the method


@METHODS.register("pmr")
class PMR(Joint):
    family = "optimisation"
    Params = PMRParams

    def __init__(self, params: PMRParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        names = self.modality_names
        if len(names) < 2:
            raise ConfigError(f"method pmr rebalances two or more modalities; the dataset has {len(names)} "
                              f"({', '.join(names)}): use method.name=unimodal or joint")
        self.gradient_rule = params.variant == "balancebenchmark" and len(names) >= 3
        if params.eta is not None and not self.gradient_rule:
            raise ConfigError(f"method.eta applies only to variant=balancebenchmark with three or more modalities "
                              f"(the dataset has {len(names)}: {', '.join(names)}); remove it")
        self.eta = BB_ETA if params.eta is None else params.eta
        self.prototypes = nn.Module()  # one C x d_m buffer per modality, saved with the checkpoints
        for m, d in setup.feature_dims().items():
            self.prototypes.register_buffer(m, torch.zeros(setup.num_classes, d))
        # host-side state (no device sync per step), saved through get_extra_state: whether the
        # prototypes exist, and the subsets' seed, the run's (the harness seeds torch before building)
        self.computed = False
        self.subset_seed = torch.initial_seed() % 2**62

    def get_extra_state(self) -> dict[str, Any]:
        return {"computed": self.computed, "subset_seed": self.subset_seed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.computed, self.subset_seed = bool(state["computed"]), int(state["subset_seed"])

    def prototype(self, m: str) -> torch.Tensor:
        return self.prototypes.get_buffer(m)

    # ---- prototypes
    def on_epoch_start(self, epoch: int) -> None:
        if not self.computed:  # before epoch 0 (a resume past it loads them)
            self.update_prototypes(self.class_means(index=0), ema=False)

    def on_epoch_end(self, epoch: int) -> None:
        ema = epoch >= 1 if self.params.variant == "release" else True
        self.update_prototypes(self.class_means(index=epoch + 1), ema=ema)

    @torch.no_grad()
    def update_prototypes(self, means: dict[str, torch.Tensor], ema: bool) -> None:
        m_coef = self.params.momentum_coef
        for m, new in means.items():
            old = self.prototype(m)
            old.copy_((1 - m_coef) * new + m_coef * old if ema else new)
        self.computed = True

    @torch.no_grad()
    def class_means(self, index: int) -> dict[str, torch.Tensor]:
        """Per modality, the class means of the eval-mode features of a random subset of the
        training split (see the module docstring); `index` seeds the subset."""
        ctx, was_training = self.step_context, self.training
        self.eval()
        generator = torch.Generator().manual_seed(self.subset_seed * 1_000_003 + index)
        sums = {m: torch.zeros_like(self.prototype(m)) for m in self.modality_names}
        counts = torch.zeros(self.num_classes, device=sums[self.modality_names[0]].device)
        seen = torch.zeros(self.num_classes, dtype=torch.bool)
        for batch in ctx.train_batches():
            keep, seen = subset_mask(batch.labels.cpu(), seen, self.params.proto_fraction, generator)
            if not keep.any():
                continue
            keep = keep.to(batch.labels.device)
            labels = batch.labels[keep]
            with ctx.autocast():
                feats = self.encode({m: x[keep] for m, x in batch.inputs.items()})
            for m in self.modality_names:
                sums[m].index_add_(0, labels, feats[m].float())
            counts += torch.bincount(labels, minlength=self.num_classes)
        self.train(was_training)
        # a class absent from the training split keeps a zero prototype rather than 0/0
        return {m: s / counts.clamp(min=1)[:, None] for m, s in sums.items()}

    # ---- the step
    def in_window(self, epoch: int) -> bool:
        return self.params.in_window(epoch)

    def entropy_on(self, epoch: int) -> bool:
        p = self.params
        return p.entropy_weight > 0 and epoch <= p.entropy_ends  # type: ignore[operator]

    def gradient_tensors(self) -> dict[str, list[nn.Parameter]]:
        """BalanceBenchmark's modulated tensors: each encoder's parameters that are not 1-D."""
        return {m: [p for p in self.encoders[m].parameters() if p.requires_grad and p.dim() != 1]
                for m in self.modality_names}

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.computed:
            raise RuntimeError("PMR.training_step before its prototypes were computed: the harness calls "
                               "on_epoch_start(0) first (a test must do the same)")
        ctx, labels, p = self.step_context, batch.labels, self.params
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(batch.inputs)
            task = self.loss(feats, labels)
        logits = {m: prototype_logits(feats[m], self.prototype(m)) for m in self.modality_names}
        pce = {m: F.cross_entropy(z, labels) for m, z in logits.items()}
        with torch.no_grad():
            scores = {m: ground_truth_scores(z.detach(), labels) for m, z in logits.items()}
        active = self.in_window(ctx.epoch)
        out: dict[str, torch.Tensor] = {}
        loss = task
        if self.gradient_rule:
            ratios, coefs = balancebenchmark_coefficients(scores, self.eta)
            out.update({f"grad_coef.{m}": k for m, k in coefs.items()})
        else:
            ratios = pace_ratios(scores)
            weights = pce_weights(ratios, p.alpha)
            if active:
                loss = loss + sum(weights[m] * pce[m] for m in self.modality_names)
            out.update({f"pce_weight.{m}": w if active else torch.zeros_like(w) for m, w in weights.items()})
        if self.entropy_on(ctx.epoch):
            entropy = {m: mean_entropy(z) for m, z in logits.items()}
            loss = loss - p.entropy_weight * sum((ratios[m] > 1).float() * entropy[m] for m in self.modality_names)
            out.update({f"entropy.{m}": h.detach() for m, h in entropy.items()})
        ctx.backward(loss)
        if self.gradient_rule and active:
            modulate_gradients_(self.gradient_tensors(), coefs)
        ctx.step()
        out.update({f"pce.{m}": v.detach() for m, v in pce.items()})
        out.update({f"ratio.{m}": r for m, r in ratios.items()})
        return {"loss": loss.detach(), "loss_task": task.detach(), **out,
                "modulated": torch.tensor(float(active))}

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        logs = {}
        if self.computed:  # the nearest prototype's accuracy per modality (the code's acc_a_p, acc_v_p)
            logs = {f"proto_acc.{m}": nearest_prototype_accuracy(feats[m], self.prototype(m), batch.labels)
                    for m in self.modality_names}
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats), logs)

