"""Seeding and batching: the same batches in the same order for a seed, resumed or not, with
any number of loader workers.

`SplitLoader` is the training data path: batches of one split, read by persistent workers into
pinned memory, copied without blocking, finished on the device (the batch halves of the views:
GPU augmentation) and laid out channels_last where asked.

A method may ask for part of the training split to be held out of training
(`Method.holdout_fraction`): `holdout_rows` picks it from the run's seed alone, so the split is the
same with any number of workers and after a resume.

A method may also choose an epoch's items (`Method.epoch_items`: rows of the training split,
repeated or left out): a pass over `items` shuffles their positions by the epoch's generator
exactly as a plain pass shuffles rows, and item seeds follow positions, so a repeated row gets
augmentations of its own; every batch carries its samples' positions (`Batch.ids`), for the method
to find what it decided for each. Without `items` a pass is what it always was.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmbalance.bench.config import TrainConfig
from mmbalance.core.errors import ConfigError
from mmbalance.core.types import Batch
from mmbalance.datasets.base import Dataset, TensorSplit
from mmbalance.datasets.batch_views import draws_key
from mmbalance.datasets.prepared import seeded

BatchView = Callable[..., torch.Tensor]

HOLDOUT_STREAM = 0x401D  # with the run's seed, the random stream of the held-out rows


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling RNG of one epoch: a function of (seed, epoch) only, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; python and numpy follow from it
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def collate(items: Batch | Sequence[tuple[dict[str, torch.Tensor], int]]) -> Batch:
    if isinstance(items, Batch):  # made whole by the split (SeededItems.__getitems__)
        return items
    modalities = items[0][0].keys()
    inputs = {m: torch.stack([torch.as_tensor(x[m]) for x, _ in items]) for m in modalities}
    return Batch(inputs, torch.tensor([y for _, y in items], dtype=torch.long))


def _tensor_batches(split: TensorSplit, batch_size: int, generator: torch.Generator | None,
                    drop_last: bool, items: Sequence[int] | None = None) -> Iterator[Batch]:
    n = len(split) if items is None else len(items)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(split.labels.device)  # once per pass, not a copy (and a GPU sync) per batch
    rows = order if items is None else torch.as_tensor(list(items), dtype=torch.long, device=order.device)[order]
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = rows[start : start + batch_size]
        yield Batch({m: t[idx] for m, t in split.inputs.items()}, split.labels[idx], order[start : start + batch_size])


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class SeededItems(torch.utils.data.Dataset):
    """`split` (or its `rows`) addressed by (seed, index): the item is computed under torch's RNG
    seeded with `seed`, so a sample's random augmentation depends on (run seed, epoch, index)
    alone, not on which worker made it, whether workers persist across epochs, or where a run
    resumed. A split that makes batches itself (CachedSplit.batch) is asked for the whole batch
    at once. With `rows`, index i is the split's item rows[i]."""

    def __init__(self, split: torch.utils.data.Dataset, rows: Sequence[int] | None = None) -> None:
        self.split = split
        self.rows = list(range(len(split))) if rows is None else [int(r) for r in rows]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, torch.Tensor], int]:
        seed, index = key
        with seeded(seed):
            return self.split[self.rows[index]]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Batch | list[tuple[dict[str, torch.Tensor], int]]:
        batch = getattr(self.split, "batch", None)
        if batch is None:
            return [self[key] for key in keys]
        return batch([self.rows[index] for _, index in keys], [seed for seed, _ in keys])


class PassSampler(torch.utils.data.Sampler):
    """Batches of (seed, index) keys for one pass over a split, or over `items` of it (indices,
    repeats allowed); the loader's owner sets the pass (order of the positions and item seeds from
    a generator, or in order with fixed seeds) before iterating. It runs in the main process, so
    persistent workers see each new pass."""

    def __init__(self, n: int, batch_size: int, drop_last: bool) -> None:
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.items: list[int] | None = None  # None: each index once, position = index
        self.order = torch.arange(n)
        self.base = 0

    def set_pass(self, generator: torch.Generator | None, batch_size: int, drop_last: bool,
                 items: Sequence[int] | None = None) -> None:
        self.batch_size, self.drop_last = batch_size, drop_last
        self.items = None if items is None else [int(i) for i in items]
        n = self.n if self.items is None else len(self.items)
        if generator is None:
            self.order, self.base = torch.arange(n), 0
        else:
            self.order = torch.randperm(n, generator=generator)
            self.base = int(torch.randint(0, 2**62, (1,), generator=generator))

    def __len__(self) -> int:
        return num_batches(len(self.order), self.batch_size, self.drop_last)

    def positions(self) -> list[list[int]]:
        """The pass's batches as positions in its list of items (the rows, without `items`)."""
        order = self.order.tolist()
        return [order[start : start + self.batch_size] for start in range(0, len(self) * self.batch_size,
                                                                           self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rows = self.items
        for batch in self.positions():
            yield [(self.base + p, p if rows is None else rows[p]) for p in batch]


class SplitLoader:
    """Batches of one split on the training device.

    `drop_last` applies to shuffled (training) passes; an in-order pass covers every item.
    In-memory splits are sliced directly. Others go through one DataLoader, built once: with
    workers they persist across passes and prefetch `prefetch` batches each, into pinned memory
    on CUDA; every batch is copied non-blocking, then finished by the split's batch views (the
    device half of the augmentation) and, with `channels_last`, images laid out NHWC.
    With `rows`, the loader's split is those items of `split`, in that order.
    """

    def __init__(self, split: torch.utils.data.Dataset, batch_size: int, device: torch.device, *,
                 finish: dict[str, BatchView] | None = None, drop_last: bool = False, workers: int = 0,
                 prefetch: int = 2, channels_last: bool = False, rows: Sequence[int] | None = None) -> None:
        if rows is not None and isinstance(split, TensorSplit):
            index = torch.as_tensor(list(rows), dtype=torch.long)
            split, rows = TensorSplit({m: t[index] for m, t in split.inputs.items()}, split.labels[index]), None
        self.split, self.batch_size, self.drop_last = split, batch_size, drop_last
        self.device, self.finish, self.channels_last = device, finish or {}, channels_last
        self.n = len(rows) if rows is not None else len(split)  # type: ignore[arg-type]
        self.sampler: PassSampler | None = None
        self.loader: DataLoader | None = None
        if isinstance(split, TensorSplit) and device.type == "cuda":  # small enough: keep it on the GPU
            self.split = TensorSplit({m: t.to(device) for m, t in split.inputs.items()}, split.labels.to(device))
        if not isinstance(split, TensorSplit):
            self.sampler = PassSampler(self.n, batch_size, drop_last)
            self.loader = DataLoader(
                SeededItems(split, rows), batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=prefetch if workers > 0 else None,
                worker_init_fn=seed_worker if workers else None,
            )

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, self.drop_last)

    def batches_over(self, items: Sequence[int] | None) -> int:
        """The batches of a shuffled pass over `items` (None: over every item once)."""
        return len(self) if items is None else num_batches(len(items), self.batch_size, self.drop_last)

    def __call__(self, generator: torch.Generator | None = None, batch_size: int | None = None,
                 items: Sequence[int] | None = None) -> Iterator[Batch]:
        """One pass: shuffled by `generator`, or in order without one; `batch_size` overrides the
        loader's for this pass (e.g. an evaluation-sized pass over the training split). With
        `items` (indices of the loader's items, repeats allowed) the pass covers those."""
        size = batch_size or self.batch_size
        drop = self.drop_last and generator is not None
        if self.loader is None:
            raw: Iterator[Batch] = _tensor_batches(self.split, size, generator, drop, items)  # type: ignore[arg-type]
        else:
            assert self.sampler is not None
            self.sampler.set_pass(generator, size, drop, items)
            positions = self.sampler.positions()  # now: a later pass may set the sampler again
            raw = (replace(batch, ids=torch.tensor(ids)) for batch, ids in zip(iter(self.loader), positions))
        for batch in raw:
            yield self.finished(batch.to(self.device))

    def finished(self, batch: Batch) -> Batch:
        inputs = dict(batch.inputs)
        for m in [m for m in self.finish if m in inputs]:
            draws = inputs.pop(draws_key(m), None)  # the per-sample draws (crops, flips) of frame views
            inputs[m] = self.finish[m](inputs[m]) if draws is None else self.finish[m](inputs[m], draws)
        if self.channels_last:
            inputs = {m: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                      for m, x in inputs.items()}
        return Batch(inputs, batch.labels, batch.ids)


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """`train.workers`, or by default: none on CPU; on CUDA the cores this process may use (the
    launchers' OMP_NUM_THREADS share, so that packed runs do not oversubscribe), at most 8."""
    if cfg.workers is not None:
        return cfg.workers
    if device.type != "cuda":
        return 0
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        cores = int(share)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


def augment_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the batch halves of the views run on the training device. `auto`: on a GPU only.
    On a CPU the views run in the loader, which reads and crops a batch at a time and resizes on
    uint8 (datasets.transforms), faster there than the batch halves' float roi_align: one core,
    CREMA-D's 341 x 256 frames to 224, 2,900 vs 400 samples/s; 32x32 frames and spectrograms,
    12,000 vs 8,900."""
    if cfg.augment != "auto":
        return cfg.augment == "device"
    return device.type == "cuda"


def holdout_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(trained, held out): the rows of an n-item training split, the held-out ones round(fraction
    n) of them (at least 1, at most n - 1), drawn by the run's seed alone. A larger fraction
    holds out a superset of a smaller one's rows. Both lists are in the split's order."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction {fraction} must be in (0, 1)")
    if n < 2:
        raise ConfigError(f"the training split has {n} item(s): too few to hold any out for the method")
    size = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(n)
    held = set(order[:size].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def build_loaders(dataset: Dataset, cfg: TrainConfig, device: torch.device,
                  holdout: float = 0.0) -> dict[str, SplitLoader]:
    """The run's loaders: `train` (augmented, training batch size; the harness also makes
    unshuffled evaluation-sized passes with it), `train_plain` (the train split with test-time
    views, for probes), `val` and `test`. With a `holdout` fraction, `train` covers only the rows
    the method trains on, and `holdout` (test-time views, evaluation batch size) the others
    (`holdout_rows`); `train_plain` stays the whole split, so that probes are as for any method."""
    on_device = augment_on_device(cfg, device)
    options = {"workers": loader_workers(cfg, device), "prefetch": cfg.prefetch,
               "channels_last": cfg.channels_last and device.type == "cuda"}

    def loader(split: str, augment: bool, batch_size: int, drop_last: bool = False,
               rows: Sequence[int] | None = None) -> SplitLoader:
        data, finish = dataset.loader_split(split, augment=augment, on_device=on_device)
        return SplitLoader(data, batch_size, device, finish=finish, drop_last=drop_last, rows=rows, **options)

    loaders = {"train_plain": loader("train", False, cfg.eval_batch_size)}
    trained = held = None
    if holdout:
        trained, held = holdout_rows(loaders["train_plain"].n, holdout, cfg.seed)
        loaders["holdout"] = loader("train", False, cfg.eval_batch_size, rows=held)
    return {
        "train": loader("train", True, cfg.batch_size, cfg.drop_last, rows=trained),
        **loaders,
        "val": loader("val", False, cfg.eval_batch_size),
        "test": loader("test", False, cfg.eval_batch_size),
    }
