"""A learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017;
the `lr_find` of fastai): a few hundred SGD steps of the joint model on the training split while
the rate grows exponentially from `lr_min` to `lr_max`, recording the loss at each step.

The loss is smoothed with a bias-corrected exponential moving average (`SMOOTHING`); the test
stops early once the smoothed loss is `DIVERGED` times its minimum (or not finite). Two classic
readings of the curve (fastai's `lr_find`): the rate at the smoothed minimum divided by
`BELOW_MINIMUM` (at the minimum the loss is about to blow up; a tenth of it still descends), and
the rate where the smoothed loss falls fastest per log-rate before the minimum (its first
`SKIP_START` steps left out: there the average has seen too few losses). The suggestion is the
lower of the two: on data that one modality separates at once the loss is near zero long before
it blows up, and a tenth of the minimum is then far above any rate that learns the slow modality.

The model is built as a run builds it (bench.train.build_method, the run's device and bf16
autocast policy) and trained by cross-entropy on its fused logits, which for `joint` is its own
training step. Deterministic for a seed: the model's initialisation, the batches and their
augmentation come from seeded generators.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch.nn.functional as F

from mmbalance.bench.config import RunConfig
from mmbalance.bench.data import build_loaders, epoch_generator, seed_everything
from mmbalance.bench.device import prepare_model, resolve_device
from mmbalance.bench.train import DatasetSource, build_dataset, build_method, build_optimizer
from mmbalance.methods.base import StepContext

log = logging.getLogger(__name__)

SMOOTHING = 0.9  # EMA factor of the loss curve (about 10 steps of memory)
DIVERGED = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum
BELOW_MINIMUM = 10.0  # one candidate: the rate at the smoothed minimum / this
SKIP_START = 10  # steps not searched for the steepest descent


@dataclass
class RangeTest:
    """The rates tried, the raw and smoothed losses, and the suggestion drawn from them."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "reached lr_max"

    @property
    def lr_at_minimum(self) -> float:
        return self.lrs[int(np.argmin(self.smoothed))]

    @property
    def steepest(self) -> float:
        """The rate where the smoothed loss falls fastest per log-rate, from step SKIP_START up to
        the minimum (the whole curve up to it when that is shorter)."""
        end = int(np.argmin(self.smoothed)) + 1
        start = SKIP_START if end - SKIP_START >= 3 else 0
        if end - start < 3 or self.lrs[start] == self.lrs[end - 1]:  # no ramp to read (lr_min == lr_max)
            return self.lrs[start]
        slope = np.gradient(np.asarray(self.smoothed[start:end]), np.log(self.lrs[start:end]))
        return self.lrs[start + int(np.argmin(slope))]

    @property
    def suggested(self) -> float:
        return min(self.lr_at_minimum / BELOW_MINIMUM, self.steepest)

    def describe(self) -> str:
        return (f"{len(self.lrs)} steps from {self.lrs[0]:.2g} to {self.lrs[-1]:.2g} ({self.stopped}); smoothed loss "
                f"{self.smoothed[0]:.3f} -> minimum {min(self.smoothed):.3f} at lr {self.lr_at_minimum:.3g}; "
                f"steepest descent at lr {self.steepest:.3g}")


def schedule(step: int, steps: int, lr_min: float, lr_max: float) -> float:
    """The exponential ramp: lr_min at step 0, lr_max at step `steps` - 1."""
    return lr_min * (lr_max / lr_min) ** (step / max(steps - 1, 1))


def smooth(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average of `losses`."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        out.append(avg / (1 - SMOOTHING ** (i + 1)))
    return out


def range_test(cfg: RunConfig, steps: int = 200, lr_min: float = 1e-4, lr_max: float = 10.0,
               datasets: DatasetSource = build_dataset) -> RangeTest:
    """Run the test on `cfg`'s data and model (its optimiser, with the rate ramped) for `steps`
    steps at most, cycling over the shuffled training split as often as needed."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    dataset = datasets(cfg)
    loaders = build_loaders(dataset, cfg.train, device)
    train = loaders["train"]
    method = build_method(cfg, dataset)
    prepare_model(method, method.encoders, cfg.train, device)
    # the harness's step context: its precision policy (bf16 autocast on CUDA when train.amp)
    context = StepContext(lambda: (build_optimizer(cfg, method.param_groups()), None), loaders["train_plain"],
                          device, cfg.train.amp)
    optimizer = context.optimizer
    method.train()
    result = RangeTest()
    for step, batch in enumerate(batches(train, cfg.train.seed)):
        if step == steps:
            break
        lr = schedule(step, steps, lr_min, lr_max)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with context.autocast():
            logits = method.predict(batch).fused
        loss = F.cross_entropy(logits.float(), batch.labels)
        loss.backward()
        optimizer.step()
        result.lrs.append(lr)
        result.losses.append(float(loss.detach()))
        if not math.isfinite(result.losses[-1]):
            result.lrs.pop(), result.losses.pop()
            result.stopped = f"loss not finite at lr {lr:.3g}"
            break
        result.smoothed = smooth(result.losses)
        if step >= 10 and result.smoothed[-1] > DIVERGED * min(result.smoothed):
            result.stopped = f"diverged at lr {lr:.3g}"
            break
    if not result.lrs:
        raise ValueError(f"learning-rate range test: the loss was not finite at the first rate {lr_min:g}")
    log.info("learning-rate range test: %s", result.describe())
    return result


def batches(loader, seed: int):
    """Shuffled passes over the training split, one after another (each pass its own order)."""
    for n in itertools.count():
        yield from loader(epoch_generator(seed, n))
