"""Sample-level modality valuation and re-sampling (Wei, Feng, Wang & Hu, CVPR 2024, "Enhancing
Multimodal Cooperation via Sample-level Modality Valuation", arXiv 2309.06255).

Release: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation @ 7ed12b0 (code/sample_level.py,
code/modality_level.py, code/datasets/dataloader.py, code/models/models.py).

The algorithm (a data-level method: the model and its loss are joint training's)
1. Valuation. Each sample's contribution of each modality is its Shapley value over the modality
   subsets S, with the value v(S) = |S| if the fusion head, fed the features of S and zeros for
   the others, classifies the sample correctly, else 0, and v(empty set) = 0:
       phi_m = sum over S not holding m of |S|! (M - |S| - 1)! / M! [v(S + m) - v(S)].
   For M = 2 this is the release's `contrib_a = (value_a + value_all - value_v) / 2` with
   value_all = 2 (sample_level.py l.99-122, models.py `exec_drop` l.74-86: the other modality's
   FEATURES zeroed, the head applied with its full bias), in evaluation mode, without gradient, on
   the whole training split in order (its training views: the release's `train_val_dataloader`).
2. Re-sampling, every epoch from `warmup` on, from contributions computed on the model as the
   epoch starts (the release computes them after epoch e >= warmup - 1 and builds epoch e + 1's
   loader from them; sample_level.py l.321-333):
   - `strategy: sample` (sample_level.py; AV_KS_Dataset_sample_level, dataloader.py l.152-186):
     the epoch trains on every sample once, plus, for each sample and each modality m, copies of
     it whose other modalities' features are zeroed (m "emphasised"): 1 copy if 0.4 < phi_m < 1,
     2 if -0.1 < phi_m < 0.4, 3 if phi_m < -0.1, none otherwise (phi_m >= 1, and the boundaries
     themselves, as the release's strict inequalities give). For M = 2: a low-audio-contribution
     sample comes again with its visual features zeroed (the release's drop = 2) and vice versa.
   - `strategy: modality` (modality_level.py l.143-161; AV_KS_Dataset_modality_level,
     dataloader.py l.297-316): the mean contributions over a random `part_ratio` share of the
     samples (drawn with replacement), gap_m = 1 - mean phi_m, d = |gap_a - gap_v| / 3 * 2 * alpha
     (the release's `func = linear`); int(d N) samples, drawn with replacement, come again with the
     modality of the smaller gap zeroed (the one of the larger gap emphasised; on a tie, audio's
     order: the second modality emphasised). Defined for M = 2 only (a clear refusal otherwise).
3. Training: cross-entropy of the fused logits on the epoch's items, the features of a copy's
   zeroed modalities set to 0 after the encoders (models.py l.62-67: `a[i, :] = 0.0`; the encoders
   still see the sample, so batch-norm statistics do, and get no gradient from it).

Harness: the epoch's items come back from `epoch_items` (rows of the training split, repeats
allowed); the harness shuffles and batches them, and each batch's `ids` (positions in the list)
find each sample's zeroed modalities. Random choices (modality level) come from a generator seeded
by (run seed, epoch), so the batches are the same with any number of workers and after a resume,
where the contributions are recomputed from the restored model, as they were.

Paper vs code, and this file's choices
- The paper's modality-level method values only the sampled subset Z (its point: cheaper); the
  release values every training sample and averages a random subset of them
  (modality_level.py l.146-154). The averages are the same; this file values only the subset
  (one pass over the part), the cost the paper states. The subset is drawn with replacement, as
  in the release.
- The release computes the contributions after every epoch, warm-up included, for its log; here
  only where they are used (from `warmup` on), and `resample: false` computes and logs them every
  epoch without re-sampling (joint training plus the valuation: tested equal to joint).
- The release's random streams (numpy's global RNG, shared with nothing else there) are replaced by
  a numpy RandomState per epoch seeded from (run seed, epoch): the same draws given the seed
  (tested beside the release's `np.random.choice` calls), not the same seeds.
- Release quirks not reproduced: `AV_KS_Dataset(mode, loader=...)` and `args.dynamic`/`args.method`
  do not exist (sample_level.py l.260, l.358), and modality_level.py's `execute_modulation`
  returns an unbound `train_dataloader` before warm-up ends (l.179): as released neither script
  runs; the intended flow is implemented.

`variant: balancebenchmark` (GeWu-Lab/BalanceBenchmark @ 4c1482f: balancemm/trainer/Sample_trainer.py
l.78-102, balancemm/evaluation/modalitys.py `Calculate_Shapley_Sample` l.58-103,
balancemm/datasets/__init__.py `create_dataset_sample_level` l.127-218 and `SampleDataset`
l.50-125): v(S) = 1 if correct (not |S|), the coalitions evaluated with the absent modalities'
INPUTS zeroed and passed through their encoders (one encoder pass per coalition), and copies train
with the other modalities' inputs zeroed. Same thresholds and copies (its loop is already for any
M). Not reproduced: its per-sample cache `res_cache` is built once outside the batch loop, so every
batch after the first reuses the first batch's correctness (every sample valued as the one at its
position in batch 0), a bug; its truncation of the split to a multiple of 64; and its
modality-level generalisation (for M = 2 it doubles the release's count and adds an unzeroed copy
of each chosen sample), which is not offered: with this variant `strategy` must be `sample`.

Reported: each step `loss` and `zeroed.<m>` (share of the batch whose m is zeroed); each epoch
that values, `contribution.<m>` (mean phi_m over the valued samples: the release's cona/conv),
`extra.<m>` (copies emphasising m, per training sample) and, at modality level, `difference` (d).
Cost: joint training's step (one forward and backward; the zeroing is a select); per valued epoch
one evaluation-mode pass over the training split (the part, at modality level), with 2^M - 1
head evaluations (`balancebenchmark`: 2^M - 1 encoder passes), and epochs longer by the copies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import Strict, tunable
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Prediction
from mmbalance.methods.base import Method, MethodSetup
from mmbalance.models.fusion import build_fusion

SAMPLING_STREAM = 0x5A17  # with the run's seed and the epoch, the modality level's random stream


class ValuationParams(Strict):
    variant: Literal["release", "balancebenchmark"] = "release"
    strategy: Literal["sample", "modality"] = "sample"
    warmup: int = Field(5, ge=0)  # epochs of joint training before the first re-sampled one
    # modality level only (strategy=sample ignores both); ranges around the release's argparse (part_ratio 0.2,
    # alpha 1) and BalanceBenchmark's config (0.2, 0.5)
    part_ratio: float = tunable(0.2, 0.05, 0.5, log=True, gt=0, le=1,  # modality level: share of samples valued
                                when={"strategy": "modality"})
    alpha: float = tunable(1.0, 0.25, 4.0, log=True, gt=0,  # modality level: scale of the re-sampled share
                           when={"strategy": "modality"})
    resample: bool = True  # false: value and log only (joint training)

    @model_validator(mode="after")
    def _strategy_of_variant(self) -> ValuationParams:
        if self.variant == "balancebenchmark" and self.strategy != "sample":
            raise ValueError("variant=balancebenchmark is offered with strategy=sample only (its modality-level "
                             "generalisation is not the release's: see methods/valuation.py)")
        return self


# ---- pure functions


def coalitions(n: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of range(n), as sorted tuples."""
    return [c for r in range(1, n + 1) for c in itertools.combinations(range(n), r)]


def shapley(correct: dict[tuple[int, ...], torch.Tensor], n: int, scale_by_size: bool) -> torch.Tensor:
    """Per-sample Shapley values [B, n] from each non-empty coalition's per-sample correctness [B]
    (bool); v(S) = |S| * correct (`scale_by_size`, the release) or correct, v(empty) = 0."""
    batch = next(iter(correct.values())).shape[0]

    def value(s: tuple[int, ...]) -> torch.Tensor:
        if not s:
            return torch.zeros(batch, dtype=torch.float64)
        return correct[s].double().cpu() * (len(s) if scale_by_size else 1)

    phi = torch.zeros(batch, n, dtype=torch.float64)
    for m in range(n):
        others = [j for j in range(n) if j != m]
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                phi[:, m] += weight * (value(tuple(sorted((*s, m)))) - value(s))
    return phi


def copies(phi: float) -> int:
    """The sample level's copies of a sample for a modality of contribution `phi` (dataloader.py
    l.156-170: strict inequalities, so 1, 0.4 and -0.1 themselves get none)."""
    if 0.4 < phi < 1:
        return 1
    if -0.1 < phi < 0.4:
        return 2
    if phi < -0.1:
        return 3
    return 0


def sample_level_items(phi: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(items, zeroed [len(items), M] bool): every row once, then for each row and each modality m
    its copies(phi[row, m]) copies with every other modality zeroed (dataloader.py l.154-186)."""
    n, m_count = phi.shape
    items, emphasised = list(range(n)), []
    for row in range(n):
        for m in range(m_count):
            k = copies(float(phi[row, m]))
            items += [row] * k
            emphasised += [m] * k
    zeroed = torch.zeros(len(items), m_count, dtype=torch.bool)
    for j, m in enumerate(emphasised):
        zeroed[n + j] = True
        zeroed[n + j, m] = False
    return items, zeroed


def modality_level_items(part_phi: torch.Tensor, n: int, alpha: float,
                         rng: np.random.RandomState) -> tuple[list[int], torch.Tensor, float]:
    """(items, zeroed, d) for two modalities from the valued part's contributions [P, 2]
    (modality_level.py l.153-161, dataloader.py l.297-316): every row once, then int(d n) rows
    drawn with replacement, the modality of the smaller gap zeroed."""
    mean = part_phi.double().sum(0) / part_phi.shape[0]
    gap = 1.0 - mean
    d = float(abs(gap[0] - gap[1]) / 3 * 2) * alpha
    chosen = rng.choice(n, int(d * n))
    zeroed = torch.zeros(n + len(chosen), 2, dtype=torch.bool)
    zeroed[n:, 1 if gap[0] > gap[1] else 0] = True  # audio's gap larger: visual zeroed (drop = 2)
    return list(range(n)) + chosen.tolist(), zeroed, d


def epoch_rng(seed: int, epoch: int) -> np.random.RandomState:
    """The modality level's random stream of one epoch: a function of (run seed, epoch) alone."""
    return np.random.RandomState(np.random.SeedSequence([seed, SAMPLING_STREAM, epoch]).generate_state(1)[0])


def zero_rows(x: torch.Tensor, zeroed: torch.Tensor) -> torch.Tensor:
    """x with the rows where `zeroed` [B] holds set to 0 (exactly: not multiplied)."""
    keep = ~zeroed.view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---- the method


@METHODS.register("valuation")
class Valuation(Method):
    family = "data"  # BalanceBenchmark's taxonomy (spec/peers.md 1.6): Modality-valuation is its Data method
    Params = ValuationParams

    def __init__(self, params: ValuationParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        if params.strategy == "modality" and len(setup.modalities) != 2:
            raise ConfigError(f"method valuation: strategy=modality is defined for two modalities (one gap "
                              f"difference), this dataset has {len(setup.modalities)}; use strategy=sample")
        self.fusion = build_fusion(setup.fusion, setup.feature_dims(), setup.num_classes, setup.conditioning)
        # the current epoch's items and zeroed modalities (None: every row once, nothing zeroed);
        # recomputed at each epoch's start from the model, so a resume needs nothing stored
        self.items: list[int] | None = None
        self.zeroed: torch.Tensor | None = None
        self.record: dict[str, float] = {}
        self.rows: int | None = None  # the training split's row count, once a pass has counted it

    # ---- valuation
    def valued(self, epoch: int) -> bool:
        return epoch >= self.params.warmup or not self.params.resample

    def correctness(self, batch: Batch) -> dict[tuple[int, ...], torch.Tensor]:
        """Each non-empty coalition's per-sample correctness on `batch`: the absent modalities'
        features (release) or inputs (balancebenchmark) zeroed."""
        names = self.modality_names
        feats = self.encode(batch.inputs) if self.params.variant == "release" else None
        out = {}
        for s in coalitions(len(names)):
            if feats is not None:
                f = {m: feats[m] if j in s else torch.zeros_like(feats[m]) for j, m in enumerate(names)}
            else:
                f = self.encode({m: x if j in s else torch.zeros_like(x) for j, (m, x) in
                                 enumerate((m, batch.inputs[m]) for m in names)})
            out[s] = self.fusion(f).argmax(1) == batch.labels
        return out

    def contributions(self, wanted: Sequence[int] | None = None) -> torch.Tensor:
        """phi [N, M] of every row of the training split, or [len(wanted), M] of the `wanted` rows
        (repeats kept, in that order), from an in-order pass (`ctx.train_batches()`) in evaluation
        mode; only the wanted rows go through the model."""
        ctx = self.step_context
        want = None if wanted is None else torch.as_tensor(list(wanted), dtype=torch.long)
        phis, where, start = [], [], 0
        was = self.training
        self.eval()
        with torch.no_grad(), ctx.autocast():
            for batch in ctx.train_batches():
                rows = batch.ids.cpu() if batch.ids is not None else torch.arange(start, start + len(batch))
                start += len(batch)
                if want is None:
                    at = rows
                else:
                    at, take = (want[:, None] == rows[None, :]).nonzero(as_tuple=True)
                    if not len(take):
                        continue
                    take = take.to(batch.labels.device)
                    batch = batch.rows(take)
                phis.append(shapley(self.correctness(batch), len(self.modality_names),
                                    self.params.variant == "release"))
                where.append(at)
        self.train(was)
        self.rows = start
        phi = torch.cat(phis)
        out = torch.empty_like(phi)
        out[torch.cat(where)] = phi
        return out

    def row_count(self) -> int:
        """The training split's rows (counted once by a pass that runs no model)."""
        if self.rows is None:
            self.rows = sum(len(b) for b in self.step_context.train_batches())
        return self.rows

    def on_epoch_start(self, epoch: int) -> None:
        self.items, self.zeroed, self.record = None, None, {}
        if not self.valued(epoch):
            return
        ctx, names = self.step_context, self.modality_names
        if self.params.strategy == "sample":
            phi = self.contributions()
            items, zeroed = sample_level_items(phi)
        else:
            rng = epoch_rng(ctx.seed, epoch)
            n = self.row_count()
            phi = self.contributions(rng.choice(n, int(n * self.params.part_ratio)).tolist())
            items, zeroed, self.record["difference"] = modality_level_items(phi, n, self.params.alpha, rng)
        n = self.rows
        for j, m in enumerate(names):
            self.record[f"contribution.{m}"] = float(phi[:, j].mean())
            self.record[f"extra.{m}"] = float((~zeroed[n:, j]).sum()) / n
        if self.params.resample:
            self.items, self.zeroed = items, zeroed.to(ctx.device)

    def epoch_items(self, epoch: int) -> list[int] | None:
        return self.items

    def epoch_log(self) -> dict[str, Any]:
        return dict(self.record)

    # ---- training and prediction
    def zeroed_in(self, batch: Batch) -> torch.Tensor | None:
        """[B, M] bool: the modalities zeroed for each sample of this epoch's batch (None: none)."""
        if self.zeroed is None:
            return None
        if batch.ids is None:
            raise RuntimeError("valuation: a re-sampled epoch's batch carries no `ids` (the harness's loader "
                               "sets them); a test must pass Batch(..., ids=positions in epoch_items)")
        return self.zeroed[batch.ids.to(self.zeroed.device)]

    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        ctx, names = self.step_context, self.modality_names
        zeroed = self.zeroed_in(batch)
        inputs = batch.inputs
        if zeroed is not None and self.params.variant == "balancebenchmark":
            inputs = {m: zero_rows(inputs[m], zeroed[:, j]) for j, m in enumerate(names)}
        ctx.zero_grad()
        with ctx.autocast():
            feats = self.encode(inputs)
            if zeroed is not None and self.params.variant == "release":
                feats = {m: zero_rows(feats[m], zeroed[:, j]) for j, m in enumerate(names)}
            loss = self.cross_entropy(self.fusion(feats), batch.labels)
        ctx.backward(loss)
        ctx.step()
        out = {"loss": loss.detach()}
        for j, m in enumerate(names):  # tensors: read once an epoch by the harness, not a sync a step
            out[f"zeroed.{m}"] = torch.zeros(()) if zeroed is None else zeroed[:, j].float().mean()
        return out

    def predict(self, batch: Batch) -> Prediction:
        feats = self.encode(batch.inputs)
        return Prediction(self.fusion(feats), self.fusion.per_modality(feats))
