"""The data path: the same batches for the same (seed, epoch), in memory or read by workers (any
number, persistent), and the batch halves of the views applied after the copy to the device."""

from __future__ import annotations

import torch

from mmbalance.bench.data import SplitLoader, collate, epoch_generator, num_batches
from mmbalance.datasets.base import TensorSplit
from mmbalance.datasets.prepared import seeded

CPU = torch.device("cpu")


class FileLikeSplit(torch.utils.data.Dataset):
    """A split read item by item (as real datasets are), whose items draw from torch's RNG the way
    the views' augmentations do."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        jitter = torch.rand(())
        return {"audio": torch.full((2,), float(i)), "visual": jitter[None]}, i % 3


def collect(loader: SplitLoader, generator=None, batch_size=None):
    return [(b.inputs["audio"][:, 0].tolist(), b.inputs["visual"][:, 0].tolist(), b.labels.tolist())
            for b in loader(generator, batch_size)]


def test_tensor_split_batches_follow_the_epoch_generator():
    loader = SplitLoader(TensorSplit({"audio": torch.arange(10.0)[:, None]}, torch.arange(10) % 2), 4, CPU)
    a = [b.inputs["audio"][:, 0].tolist() for b in loader(epoch_generator(0, 3))]
    b = [b.inputs["audio"][:, 0].tolist() for b in loader(epoch_generator(0, 3))]
    c = [b.inputs["audio"][:, 0].tolist() for b in loader(epoch_generator(0, 4))]
    assert a == b and a != c
    assert sorted(sum(a, [])) == list(map(float, range(10)))
    assert [len(x) for x in a] == [4, 4, 2] and len(loader) == 3
    dropping = SplitLoader(loader.split, 4, CPU, drop_last=True)
    assert [len(x) for x in dropping(epoch_generator(0, 3))] == [4, 4] == [4] * num_batches(10, 4, True)
    assert [len(x) for x in dropping()] == [4, 4, 2]  # an in-order pass (evaluation, selection) drops nothing
    dropping_pool = SplitLoader(FileLikeSplit(10), 4, CPU, drop_last=True)
    assert [len(x[2]) for x in collect(dropping_pool, epoch_generator(0, 3))] == [4, 4]
    assert [len(x[2]) for x in collect(dropping_pool)] == [4, 4, 2]
    assert [b.inputs["audio"][:, 0].tolist() for b in loader()] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0],
                                                                    [8.0, 9.0]]


def test_items_are_the_same_with_any_number_of_persistent_workers():
    split = FileLikeSplit(12)
    inline = SplitLoader(split, 4, CPU)
    pooled = SplitLoader(split, 4, CPU, workers=2, prefetch=2)
    first = collect(inline, epoch_generator(1, 0))
    assert collect(pooled, epoch_generator(1, 0)) == first  # the persistent pool, first pass
    assert collect(pooled, epoch_generator(1, 1)) == collect(inline, epoch_generator(1, 1))  # and the next
    assert collect(inline, epoch_generator(1, 0)) == first  # a resumed run sees the same epoch again
    assert [x[0] for x in collect(inline, epoch_generator(1, 1))] != [x[0] for x in first]
    jitters = [j for _, js, _ in first for j in js]
    assert len(set(jitters)) == len(jitters)  # every item its own random stream
    labels = [y for _, _, ys in first for y in ys]
    assert labels == [int(v) % 3 for vs, _, _ in first for v in vs]
    # an unshuffled pass at another batch size through the same pool
    assert [len(x[2]) for x in collect(pooled, None, 5)] == [5, 5, 2]


def test_batch_views_and_channels_last_run_after_the_copy():
    split = FileLikeSplit(6)
    loader = SplitLoader(split, 3, CPU, finish={"audio": lambda x: x * 10}, channels_last=True)
    batch = next(loader())
    assert batch.inputs["audio"][:, 0].tolist() == [0.0, 10.0, 20.0]
    images = TensorSplit({"visual": torch.rand(4, 3, 5, 6)}, torch.zeros(4))
    nhwc = next(SplitLoader(images, 4, CPU, channels_last=True)())
    assert nhwc.inputs["visual"].is_contiguous(memory_format=torch.channels_last)


class BatchingSplit(FileLikeSplit):
    """A split that makes whole batches itself (as CachedSplit does), with per-sample draws beside
    `visual`; it has no item path, so a loader must ask it for batches."""

    def __getitem__(self, i: int):
        raise AssertionError("asked for an item, not a batch")

    def batch(self, indices, seeds):
        items = []
        for i, seed in zip(indices, seeds):
            with seeded(seed):
                items.append(FileLikeSplit.__getitem__(self, i))
        batch = collate(items)
        batch.inputs["visual.draws"] = batch.inputs["visual"] * 100
        return batch


def test_a_split_that_batches_is_asked_for_batches_and_its_draws_reach_the_batch_halves():
    expected = collect(SplitLoader(FileLikeSplit(12), 4, CPU), epoch_generator(2, 0))
    for workers in (0, 2):
        loader = SplitLoader(BatchingSplit(12), 4, CPU, workers=workers, finish={"visual": lambda x, draws: x + draws})
        batches = list(loader(epoch_generator(2, 0)))
        assert all("visual.draws" not in b.inputs for b in batches)
        got = [(b.inputs["audio"][:, 0].tolist(), (b.inputs["visual"][:, 0] / 101).tolist(), b.labels.tolist())
               for b in batches]
        assert [(a, c) for a, _, c in got] == [(a, c) for a, _, c in expected]
        assert all(torch.allclose(torch.tensor(v), torch.tensor(w)) for (_, v, _), (_, w, _) in zip(got, expected))


def test_loader_workers_default_to_the_process_cpu_share_on_cuda_only(monkeypatch):
    from mmbalance.bench.config import TrainConfig
    from mmbalance.bench.data import loader_workers

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert loader_workers(TrainConfig(workers=3), cuda) == 3
    assert loader_workers(TrainConfig(workers=0), cuda) == 0
    assert loader_workers(TrainConfig(), CPU) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a launcher's share of the cores
    assert loader_workers(TrainConfig(), cuda) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    assert loader_workers(TrainConfig(), cuda) == 8


def test_auto_augments_per_batch_on_a_gpu_only():
    """On a CPU the loader's batched views beat the batch halves' roi_align (issue 16)."""
    from mmbalance.bench.config import TrainConfig
    from mmbalance.bench.data import augment_on_device

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert not augment_on_device(TrainConfig(), CPU)
    assert not augment_on_device(TrainConfig(workers=1), CPU)
    assert augment_on_device(TrainConfig(), cuda) and augment_on_device(TrainConfig(workers=2), cuda)
    assert not augment_on_device(TrainConfig(augment="loader"), cuda)
    assert augment_on_device(TrainConfig(augment="device", workers=1), CPU)


def test_the_loaders_pinning_reaches_a_batch(monkeypatch):
    """DataLoader(pin_memory=True) pins what has a pin_memory() method and passes other objects
    through untouched: without Batch.pin_memory every GPU copy came from pageable memory."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    from mmbalance.core.types import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    batch = Batch({"audio": torch.ones(2, 3), "visual": torch.zeros(2, 1)}, torch.tensor([0, 1]))
    out = loader_pin(batch)
    assert isinstance(out, Batch) and len(pinned) == 3
    assert torch.equal(out.inputs["audio"], batch.inputs["audio"]) and out.inputs["audio"] is not batch.inputs["audio"]
