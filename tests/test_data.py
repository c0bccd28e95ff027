"""Batching: the same batches for the same (seed, epoch), in memory or through DataLoader workers."""

from __future__ import annotations

import numpy as np
import torch

from bench.data import batches, epoch_generator, num_batches
from datasets.base import TensorSplit


class FileLikeSplit(torch.utils.data.Dataset):
    """A split read item by item (as real datasets are), whose items use numpy randomness the
    way augmentations do, to check that workers are seeded."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        jitter = np.random.random()  # seeded per worker by the loader
        return {"audio": torch.full((2,), float(i)), "visual": torch.tensor([jitter])}, i % 3


def collect(split, **kwargs):
    return [(b.inputs["audio"][:, 0].tolist(), b.inputs["visual"][:, 0].tolist(), b.labels.tolist())
            for b in batches(split, 4, **kwargs)]


def test_tensor_split_batches_follow_the_epoch_generator():
    split = TensorSplit({"audio": torch.arange(10.0)[:, None]}, torch.arange(10) % 2)
    a = [b.inputs["audio"][:, 0].tolist() for b in batches(split, 4, shuffle=True, generator=epoch_generator(0, 3))]
    b = [b.inputs["audio"][:, 0].tolist() for b in batches(split, 4, shuffle=True, generator=epoch_generator(0, 3))]
    c = [b.inputs["audio"][:, 0].tolist() for b in batches(split, 4, shuffle=True, generator=epoch_generator(0, 4))]
    assert a == b and a != c
    assert sorted(sum(a, [])) == list(map(float, range(10)))
    assert [len(x) for x in a] == [4, 4, 2]
    dropped = list(batches(split, 4, shuffle=True, generator=epoch_generator(0, 3), drop_last=True))
    assert [len(x) for x in dropped] == [4, 4] == [4] * num_batches(10, 4, True)
    ordered = [b.inputs["audio"][:, 0].tolist() for b in batches(split, 4, shuffle=False)]
    assert ordered == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]


def test_dataloader_path_is_deterministic_with_seeded_workers():
    split = FileLikeSplit(12)
    runs = [collect(split, shuffle=True, generator=epoch_generator(1, 0), workers=2) for _ in range(2)]
    assert runs[0] == runs[1]
    other_epoch = collect(split, shuffle=True, generator=epoch_generator(1, 1), workers=2)
    assert [x[0] for x in other_epoch] != [x[0] for x in runs[0]]
    # items see distinct numpy streams across workers (no two workers repeat the same jitter)
    jitters = [j for _, js, _ in runs[0] for j in js]
    assert len(set(jitters)) == len(jitters)
    labels = [y for _, _, ys in runs[0] for y in ys]
    values = [int(v) for vs, _, _ in runs[0] for v in vs]
    assert labels == [v % 3 for v in values]
