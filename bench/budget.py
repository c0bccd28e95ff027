"""What a sweep's runs cost here, from a few timed steps, and how many epochs fit a time budget.

Each cell is built as its runs build it (bench.train.Trainer: its data views, loader, device and
method) on the first rows of each split (`FirstRows`), trains one short epoch to warm up (lazy
initialisation, allocator, cuDNN autotuning) and one that is timed, then evaluates val twice (the
second timed). A run of E epochs is then estimated as

    E x (n_train / train rate + (n_val + n_test) x eval time per sample)       training, evaluation
    + (n_train + n_val + n_test) x eval time per sample                          the probes' features

(the probes' logistic regressions and the start-up are left out: seconds, against minutes of
training). Staged methods are timed in their first epoch, which for MIE (one encoder) is cheaper
than its later stages: the estimate is then low by up to the ratio in `mmbalance bench`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmbalance.bench.config import RunConfig
from mmbalance.bench.store import RunDir
from mmbalance.bench.train import DatasetSource, Trainer, build_dataset
from mmbalance.core.types import Modality
from mmbalance.datasets.base import Dataset, TensorSplit

log = logging.getLogger(__name__)

TIMED_STEPS = 3  # training steps per timed epoch


class FirstRows(Dataset):
    """The first `rows` rows of each split of `dataset`, with its views, modalities and classes."""

    def __init__(self, dataset: Dataset, rows: int) -> None:
        super().__init__(dataset.params)
        self.dataset, self.rows = dataset, rows
        self.registry_name = dataset.registry_name

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.dataset.modalities

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def split(self, name: str) -> torch.utils.data.Dataset:
        return self.first(self.dataset.split(name))

    def loader_split(self, name: str, *, augment: bool, on_device: bool) -> tuple[torch.utils.data.Dataset, dict]:
        data, finish = self.dataset.loader_split(name, augment=augment, on_device=on_device)
        return self.first(data), finish

    def first(self, data: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        n = min(self.rows, len(data))  # type: ignore[arg-type]
        if isinstance(data, TensorSplit):  # kept in memory, so that it is batched as the run batches it
            return TensorSplit({m: t[:n] for m, t in data.inputs.items()}, data.labels[:n])
        return torch.utils.data.Subset(data, range(n))


@dataclass(frozen=True)
class RunCost:
    """One cell's measured rates and its runs' estimated seconds."""

    label: str
    train_samples_per_s: float
    eval_s_per_sample: float
    epoch_s: float  # one epoch: training + evaluation of val and test
    fixed_s: float  # once per run: the probes' feature passes

    def run_s(self, epochs: int) -> float:
        return epochs * self.epoch_s + self.fixed_s


def time_run(cfg: RunConfig, sizes: dict[str, int], datasets: DatasetSource = build_dataset) -> RunCost:
    """Measure `cfg`'s training and evaluation rates on a few batches; `sizes`: rows per split."""
    rows = TIMED_STEPS * cfg.train.batch_size
    with tempfile.TemporaryDirectory(prefix="mmb-timing-") as tmp:  # the trainer writes nothing there
        trainer = Trainer(cfg, RunDir(Path(tmp) / "timing"), lambda c: FirstRows(datasets(c), rows))
        trainer.train_epoch(0)  # warm-up
        rate = trainer.train_epoch(0)["samples_per_s"]
        evaluated = len(trainer.loaders["val"].split)  # type: ignore[arg-type]
        trainer.evaluate("val")
        start = time.perf_counter()
        trainer.evaluate("val")
        eval_s = (time.perf_counter() - start) / max(evaluated, 1)
    n_train, n_eval = sizes["train"], sizes["val"] + sizes["test"]
    epoch_s = n_train / rate + n_eval * eval_s
    cost = RunCost(cfg.label or cfg.method["name"], rate, eval_s, epoch_s, (n_train + n_eval) * eval_s)
    log.info("timed %s: %.0f training samples/s, %.2f ms per evaluated sample, %.1f s per epoch",
             cost.label, rate, eval_s * 1000, epoch_s)
    return cost


@dataclass(frozen=True)
class EpochFit:
    epochs: int
    estimated_s: float  # every run of the sweep at `epochs`, one after another
    budget_s: float
    fits: bool  # False: even `lowest` epochs exceed the budget

    def describe(self) -> str:
        verdict = "within" if self.fits else "OVER"
        return f"about {self.estimated_s / 60:.1f} min for every run, {verdict} the {self.budget_s / 60:g} min budget"


def fit_epochs(costs: Sequence[RunCost], seeds: int, budget_s: float, lowest: int, highest: int) -> EpochFit:
    """The most epochs (within [lowest, highest]) at which `seeds` runs of every cell, one after
    another, take at most `budget_s`."""
    per_epoch = seeds * sum(c.epoch_s for c in costs)
    fixed = seeds * sum(c.fixed_s for c in costs)
    fitting = math.floor((budget_s - fixed) / per_epoch) if per_epoch > 0 else highest
    epochs = min(max(fitting, lowest), highest)
    total = seeds * sum(c.run_s(epochs) for c in costs)
    return EpochFit(epochs, total, budget_s, fitting >= lowest)
