"""Seeding and batching: the same batches in the same order for a seed, resumed or not."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.base import TensorSplit
from methods.base import Batch


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


def collate(items: Sequence[tuple[dict[str, torch.Tensor], int]]) -> Batch:
    modalities = items[0][0].keys()
    inputs = {m: torch.stack([torch.as_tensor(x[m]) for x, _ in items]) for m in modalities}
    return Batch(inputs, torch.tensor([y for _, y in items], dtype=torch.long))


def batches(
    split: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Batches of `split`. In-memory splits are sliced directly (no per-item collation)."""
    if isinstance(split, TensorSplit):
        yield from _tensor_batches(split, batch_size, shuffle, generator, drop_last)
        return
    loader = DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        collate_fn=collate,
        pin_memory=pin_memory,
    )
    yield from loader


def _tensor_batches(
    split: TensorSplit,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[Batch]:
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield Batch({m: t[idx] for m, t in split.inputs.items()}, split.labels[idx])


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
