"""What a sweep's runs cost here, from a few timed steps, and how many epochs fit a time budget.

Each cell is built as its runs build it (bench.train.Trainer: its data views, loader, device and
method) on a few rows of each split (`FewRows`), trains one short epoch to warm up (lazy
initialisation, allocator, cuDNN autotuning) and one that is timed, then evaluates val twice (the
second timed). What a run spends besides training and evaluating (start-up, checkpoints and records after every
epoch, the probes' fits) is measured once, from two complete runs of joint training (1 and 3
epochs, one batch of rows, a scratch store) less their training and evaluation (`time_overhead`).
A run of E epochs is then estimated as

    E x (n_train / train rate + (n_val + n_test) x eval time per sample + overhead per epoch)
    + (n_train + n_val + n_test) x eval time per sample + overhead per run   (the probes' features)

Staged methods are timed in their first epoch, which for MIE (one encoder) is cheaper than its
later stages: the estimate is then low by up to the ratio in `mmbalance bench`.
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
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.train import DatasetSource, Trainer, build_dataset, run
from mmbalance.core.types import Modality
from mmbalance.datasets.base import Dataset, TensorSplit

log = logging.getLogger(__name__)

TIMED_STEPS = 3  # training steps per timed epoch


class FewRows(Dataset):
    """`rows` rows of each split of `dataset`, evenly spaced through it (a split ordered by class
    keeps its classes, which the probes need), with its views, modalities and classes."""

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
        return self.few(self.dataset.split(name))

    def loader_split(self, name: str, *, augment: bool, on_device: bool) -> tuple[torch.utils.data.Dataset, dict]:
        data, finish = self.dataset.loader_split(name, augment=augment, on_device=on_device)
        return self.few(data), finish

    def few(self, data: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        total = len(data)  # type: ignore[arg-type]
        picked = (torch.linspace(0, total - 1, min(self.rows, total)).round().long() if total
                  else torch.zeros(0, dtype=torch.long))
        if isinstance(data, TensorSplit):  # kept in memory, so that it is batched as the run batches it
            return TensorSplit({m: t[picked.to(t.device)] for m, t in data.inputs.items()},
                               data.labels[picked.to(data.labels.device)])
        return torch.utils.data.Subset(data, picked.tolist())


@dataclass(frozen=True)
class Overhead:
    """Seconds a run spends besides training and evaluating: per epoch and once per run."""

    epoch_s: float = 0.0
    run_s: float = 0.0


@dataclass(frozen=True)
class RunCost:
    """One cell's measured rates and its runs' estimated seconds."""

    label: str
    train_samples_per_s: float
    eval_s_per_sample: float
    epoch_s: float  # one epoch: training, evaluation of val and test, and the overhead per epoch
    fixed_s: float  # once per run: the probes' feature passes and the overhead per run

    def run_s(self, epochs: int) -> float:
        return epochs * self.epoch_s + self.fixed_s


def time_overhead(cfg: RunConfig, datasets: DatasetSource = build_dataset) -> Overhead:
    """The overhead of `cfg`'s runs: two complete runs on one batch of rows (1 and 3 epochs),
    in a scratch store, less the training and evaluation measured on the same rows."""
    rows = cfg.train.batch_size
    source = lambda c: FewRows(datasets(c), rows)  # noqa: E731
    walls = {}
    with tempfile.TemporaryDirectory(prefix="mmb-overhead-") as tmp:
        for epochs in (1, 3):
            short = cfg.model_copy(deep=True)
            short.train.epochs = epochs
            start = time.perf_counter()
            run(short, Store(tmp), datasets=source)
            walls[epochs] = time.perf_counter() - start
    sizes = {s: len(source(cfg).split(s)) for s in ("train", "val", "test")}
    inner = time_run(cfg, sizes, datasets)  # training and evaluating those rows
    per_epoch = max((walls[3] - walls[1]) / 2 - inner.epoch_s, 0.0)
    overhead = Overhead(per_epoch, max(walls[1] - (walls[3] - walls[1]) / 2 - inner.fixed_s, 0.0))
    log.info("overhead of a run: %.2f s per epoch, %.1f s per run", overhead.epoch_s, overhead.run_s)
    return overhead


def time_run(cfg: RunConfig, sizes: dict[str, int], datasets: DatasetSource = build_dataset,
             overhead: Overhead = Overhead()) -> RunCost:
    """Measure `cfg`'s training and evaluation rates on a few batches; `sizes`: rows per split."""
    rows = TIMED_STEPS * cfg.train.batch_size
    with tempfile.TemporaryDirectory(prefix="mmb-timing-") as tmp:  # the trainer writes nothing there
        # a method's required runs (UMT's teachers) cost the same untrained: stand-ins, not the store's
        trainer = Trainer(cfg, RunDir(Path(tmp) / "timing"), lambda c: FewRows(datasets(c), rows), stand_ins=True)
        trainer.train_epoch(0)  # warm-up
        rate = trainer.train_epoch(0)["samples_per_s"]
        evaluated = len(trainer.loaders["val"].split)  # type: ignore[arg-type]
        trainer.evaluate("val")
        start = time.perf_counter()
        trainer.evaluate("val")
        eval_s = (time.perf_counter() - start) / max(evaluated, 1)
    n_train, n_eval = sizes["train"], sizes["val"] + sizes["test"]
    epoch_s = n_train / rate + n_eval * eval_s + overhead.epoch_s
    cost = RunCost(cfg.label or cfg.method["name"], rate, eval_s, epoch_s, (n_train + n_eval) * eval_s + overhead.run_s)
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
