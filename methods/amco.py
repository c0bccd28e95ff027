"""AMCo: adaptive mask co-optimisation (Zhou et al., ICASSP 2024, "Adaptive Mask Co-Optimization
for Modal Dependence in Multimodal Learning"), as BalanceBenchmark releases it.

The paper's authors released no code that could be found (searched by title and method name);
the reference is BalanceBenchmark's (GeWu-Lab/BalanceBenchmark @ 4c1482f):
balancemm/trainer/AMCo_trainer.py (`AMCoTrainer`, lines cited as T:<line>) and
`BaseClassifierAMCoModel` in balancemm/models/avclassify_model.py (M:<line>).

The model (M:326-385): concat fusion split by modality as everywhere in the suite, each modality's
logits u_m = f_m W_m^T + b/M (the head's block of weights and its share of the bias); the fused
logits are z = L*(sum_m mask_m * u_m), where L* (`linear_star`) is an extra C x C linear layer on
the fused logits (nn.Linear's default initialisation, M:329) and mask_m is the step's mask for a
modality marked dependent, ones otherwise.

Per step, inside the window `modulation_starts <= epoch <= modulation_ends` (inclusive, 0-based;
BalanceBenchmark's 0 and 80, configs/trainer_config.yaml L20-28):
1. The mask (T:73-84), drawn at EVERY step, inside the window or not: p_t = sin(pi/2 min(eps, l_t)
   / eps), N = int(p_t C), a vector of C - N ones and N zeros shuffled by numpy's global RNG
   (np.random.shuffle, checkpointed by the harness, so resume is exact); then l_t += epoch / 10.
   l_t starts at 0 every epoch (T:63), so epoch 0 never masks and, with eps 0.3, epoch e >= 1
   masks every class of a dependent modality from its ceil(3 / e)-th step on.
2. u_m is multiplied by the mask where modality m was marked dependent by the previous step
   (M:376-377); z as above.
3. L = CE(z, y) + sum_m CE(u_m, y), u_m masked (T:142-146; the release backs each term
   separately, here their sum once: the same gradients).
4. Dependence for the next step (T:147-156): the softmax over the concatenated (masked) logits
   [u_1, ..., u_M] of every sample (B x MC), and each modality's share of that mass averaged over
   the batch, s_m = sum over its block / B (the "performance score"); m is dependent when
   s_m > sigma. The flags start False every epoch (T:59-61).
Outside the window a step is CE(z, y) alone, unmasked (T:127-130, 157-158), and the flags keep
their values.

Departures from the release, all where it does not run as written:
- The mask is expanded to two rows, `mask_t.expand(2, -1)` (T:83), which broadcasts against a
  B x C logit matrix only for B <= 2, or when DataParallel on exactly two GPUs scatters one row to
  each replica (train.py L69 wraps the model over every visible GPU) -- and then the replicas'
  attributes that the trainer reads never reach the wrapped module. Here the one row applies to
  every sample, what every working configuration of the release computes.
- The dependence flags are kept as 0-d tensors (a 0/1 mix of the mask and ones), not Python bools,
  so that the step never waits for the GPU; the values are the same.
- `alpha` and `method` (T:20-21) are read and never used; `U` 512 (T:27) likewise. The paper's
  method is described as masking the dominant modality's FEATURES (U is ResNet18's feature width);
  the release masks its class logits. The paper's text could not be read, so its form is not
  offered as a variant: everything above is the release's.
Fusion: concat, the release's, the one head whose fused logits are the sum of its split (the sum
head's split shares each head's bias among the modalities); other heads are refused. Any M >= 2:
the release's rule is written for any number of modalities (one dependent modality per step at
most when sigma >= 0.5, since the shares sum to 1).

`score.<m>` is reported at every step (outside the window from the unmasked logits, not acted on).
`linear_star=False` drops L* (z = sum_m mask_m u_m, the plain head), so that with the window closed
AMCo is exactly joint training; the default keeps it, as the release does.

Each step reports `loss` (the fused cross-entropy, the release's returned loss), `loss_total` (what
was optimised), `score.<m>` (s_m), `dependent.<m>` (the flag used for this step's mask),
`masked.<m>` (the fraction of m's logits zeroed this step), `mask_ratio` (p_t) and `modulated`.
Cost: one forward and one backward pass per step, as joint training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Window, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion


class AMCoParams(Window):
    # BalanceBenchmark's configs/trainer_config.yaml L20-28; the search ranges centre on its values, the only
    # ones published (no release by the authors, paper text unread)
    sigma: float = tunable(0.5, 0.3, 0.9, ge=0, le=1)  # the share of the softmax mass that makes a modality dependent
    eps: float = tunable(0.3, 0.1, 3.0, log=True, gt=0)  # l_t at which the mask ratio reaches 1
    modulation_ends: int | None = Field(80, ge=0)  # None: no end
    linear_star: bool = True  # the release's extra C x C layer on the fused logits


# ------------------------------------------------------------------- the mask (pure functions)


def mask_ratio(l_t: float, eps: float) -> float:
    """p_t = sin(pi/2 min(eps, l_t) / eps), in float64 as numpy computes it (T:74)."""
    return float(np.sin(np.pi / 2 * (min(eps, l_t) / eps)))


def class_mask(p_t: float, num_classes: int) -> np.ndarray:
    """C - int(p_t C) ones and int(p_t C) zeros, shuffled by numpy's global RNG (T:75-78)."""
    n = int(p_t * num_classes)
    mask = np.pad(np.ones(num_classes - n), (0, n))
    np.random.shuffle(mask)
    return mask


def dependence_scores(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s_m: modality m's share of the softmax over the concatenated logits, averaged over the batch."""
    probs = torch.softmax(torch.cat([z.float() for z in logits.values()], dim=1), dim=1)
    blocks = probs.split([z.shape[1] for z in logits.values()], dim=1)
    return {m: block.sum() / len(block) for m, block in zip(logits, blocks)}


def masked_logits(logits: dict[str, torch.Tensor], mask: torch.Tensor,
                  dependent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """u_m * mask where m is dependent (flag 1), u_m where it is not (flag 0)."""
    return {m: z * (dependent[m] * mask + (1 - dependent[m])) for m, z in logits.items()}


# ------------------------------------------------------------------------------------ the method


@METHODS.register("amco")
class AMCo(Method):
    family = "feed-forward"  # BalanceBenchmark's taxonomy (its method table): masks in the forward pass
    Params = AMCoParams

    def __init__(self, params: AMCoParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if setup.fusion != "concat":
            raise ConfigError(
                f"method amco masks each modality's share of the fused logits, which model.fusion="
                f"{setup.fusion!r} does not split into; set model.fusion=concat (the release's)")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes)
        self.linear_star = nn.Linear(setup.num_classes, setup.num_classes) if params.linear_star else None
        self.reset_dependence()

    def reset_dependence(self) -> None:
        # host-side per-epoch state (T:59-63); the harness resumes at epoch starts, where it resets
        self.l_t = 0.0
        self.dependent: dict[str, torch.Tensor] = {m: torch.zeros(()) for m in self.modality_names}

    def on_epoch_start(self, epoch: int) -> None:
        self.reset_dependence()

    def in_window(self, epoch: int) -> bool:
        return self.params.in_window(epoch)

    def fuse(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        z = sum(logits.values())
        return self.linear_star(z) if self.linear_star is not None else z

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, labels, device = self.step_context, batch.labels, batch.labels.device
        p_t = mask_ratio(self.l_t, self.params.eps)
        mask = torch.from_numpy(class_mask(p_t, self.num_classes)).float().to(device)
        self.l_t += ctx.epoch / 10
        active = self.in_window(ctx.epoch)
        dependent = {m: d.to(device) for m, d in self.dependent.items()}
        ctx.zero_grad()
        with ctx.autocast():
            logits = self.fusion.per_modality(self.encode(batch.inputs))
            if active:
                logits = masked_logits(logits, mask, dependent)
            loss = self.cross_entropy(self.fuse(logits), labels)
            total = (loss + sum(self.cross_entropy(u, labels) for u in logits.values())) if active else loss
        ctx.backward(total)
        ctx.step()

        with torch.no_grad():
            scores = dependence_scores(logits)
        if active:
            self.dependent = {m: (s > self.params.sigma).float() for m, s in scores.items()}
        out = {"loss": loss.detach(), "loss_total": total.detach()}
        zeroed = 1 - mask.mean()
        for m in self.modality_names:
            out[f"score.{m}"] = scores[m]
            out[f"dependent.{m}"] = dependent[m]
            out[f"masked.{m}"] = dependent[m] * zeroed if active else torch.zeros((), device=device)
        out["mask_ratio"] = torch.tensor(p_t)
        out["modulated"] = torch.tensor(float(active))
        return out

    def predict(self, batch: Batch) -> Prediction:
        logits = self.fusion.per_modality(self.encode(batch.inputs))
        return Prediction(self.fuse(logits), logits)
