"""The shared pieces of the real-dataset layer: validation carving, split comparison, load-time views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmbalance.core.errors import DataError
from mmbalance.datasets.cache import ArraySpec, Cache, CacheMeta, CacheWriter, SizedFrames
from mmbalance.datasets.splits import Flavour, ValCarving, carve_val, compare_with_published, list_sha256
from mmbalance.datasets.transforms import FrameClip, SpectrogramView, segment_indices, window_indices


def test_carve_val_is_stratified_and_order_free():
    ids = [f"s{i:03d}" for i in range(100)]
    labels = [0] * 60 + [1] * 30 + [2] * 10
    train, val = carve_val(ids, labels, ValCarving(fraction=0.1, seed=0))
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    by_class = [sum(labels[ids.index(v)] == c for v in val) for c in range(3)]
    assert by_class == [6, 3, 1]
    # the same ids in another order give the same split; another seed another one
    order = np.random.default_rng(1).permutation(100)
    _, val2 = carve_val([ids[i] for i in order], [labels[i] for i in order], ValCarving(fraction=0.1, seed=0))
    assert val2 == val
    _, val3 = carve_val(ids, labels, ValCarving(fraction=0.1, seed=1))
    assert val3 != val


def test_carve_val_largest_remainder_and_errors():
    ids = [f"x{i}" for i in range(7)]
    _, val = carve_val(ids, [0, 0, 0, 1, 1, 1, 1], ValCarving(count=3, seed=0))
    assert len(val) == 3  # shares 9/7 and 12/7 -> 1 + 2 after the largest remainder
    with pytest.raises(DataError, match="impossible"):
        carve_val(ids, [0] * 7, ValCarving(count=7))


def test_list_sha_is_order_free_and_compare_reports_counts():
    assert list_sha256(["b", "a"]) == list_sha256(["a", "b"]) != list_sha256(["a"])
    flavour = Flavour(source="paper", counts={"train": 2, "test": 1})
    info = compare_with_published({"train": ["a", "b"], "test": ["c"]}, flavour)
    assert info["is_published_split"] is True
    assert info["splits"]["train"] == {"listed": 2, "sha256": list_sha256(["a", "b"]), "published_count": 2}
    info = compare_with_published({"train": ["a"], "test": ["c"]}, flavour)
    assert info["is_published_split"] is False
    # with nothing published there is nothing to match
    nothing = compare_with_published({"train": ["a"]}, Flavour(source="your CSV"))
    assert nothing["is_published_split"] is None


def test_segment_indices_train_within_segments_and_test_centres():
    assert segment_indices(10, 3, train=False) == [1, 5, 8]  # centres of [0,3.3) [3.3,6.7) [6.7,10)
    assert segment_indices(3, 1, train=False) == [1]
    assert segment_indices(2, 3, train=False) == [0, 1, 1]  # fewer frames than segments repeat
    torch.manual_seed(0)
    for _ in range(50):
        a, b, c = segment_indices(10, 3, train=True)
        assert 0 <= a <= 3 and 3 <= b <= 6 and 6 <= c <= 9


def test_window_indices():
    assert window_indices(20, 10, train=False) == list(range(5, 15))
    assert window_indices(4, 6, train=False) == [0, 1, 2, 3, 3, 3]
    torch.manual_seed(0)
    starts = {window_indices(20, 10, train=True)[0] for _ in range(100)}
    assert starts <= set(range(11)) and len(starts) > 5


def test_frame_clip_test_view_normalises_and_orders_axes():
    frames = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    frames[1] = 255
    view = FrameClip(train=False, frames=1, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = view(frames, 2)  # 2 real frames -> centre of [0, 2) is frame 1
    assert x.shape == (3, 1, 16, 16)
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    assert view.shape((4, 16, 16, 3)) == (3, 1, 16, 16)


def test_frame_clip_train_view_crops_and_adds_noise():
    frames = np.full((2, 40, 40, 3), 128, dtype=np.uint8)
    torch.manual_seed(0)
    view = FrameClip(train=True, frames=2, size=32, mean=(0, 0, 0), std=(1, 1, 1), noise_std=0.1)
    x = view(frames, 2)
    assert x.shape == (3, 2, 32, 32)
    assert abs(float(x.std()) - 0.1) < 0.01 and abs(float(x.mean()) - 128 / 255) < 0.01
    quiet = FrameClip(train=False, frames=2, size=32, mean=(0, 0, 0), std=(1, 1, 1), noise_std=0.1)
    assert float(quiet(frames, 2).std()) < 1e-4  # noise only in training unless noise_at_test


def test_spectrogram_view_crop():
    spec = np.arange(2 * 10, dtype=np.float16).reshape(2, 10)
    assert SpectrogramView(train=False, crop=4)(spec).tolist() == [[[3, 4, 5, 6], [13, 14, 15, 16]]]
    assert SpectrogramView(train=False)(spec).shape == (1, 2, 10)
    torch.manual_seed(0)
    starts = {int(SpectrogramView(train=True, crop=4)(spec)[0, 0, 0]) for _ in range(50)}
    assert starts == set(range(7))


def test_spectrogram_view_time_first_with_frame_count_and_normalisation():
    spec = np.arange(10 * 2, dtype=np.float16).reshape(10, 2)  # (T, F): row t holds 2t, 2t + 1
    view = SpectrogramView(train=False, crop=4, time_axis=0, norm=(1.0, 2.0))
    assert view.shape((10, 2)) == (1, 4, 2)
    # 6 real frames: the centred window of them starts at frame 1, then (x - 1) / 2
    assert view(spec, 6).tolist() == [[[0.5, 1.0], [1.5, 2.0], [2.5, 3.0], [3.5, 4.0]]]
    torch.manual_seed(0)
    starts = {int(SpectrogramView(train=True, crop=4, time_axis=0)(spec, 6)[0, 0, 0]) // 2 for _ in range(50)}
    assert starts == {0, 1, 2}  # within the real frames only
    half, batch = view.deferred()
    assert torch.equal(batch(half(spec, 6)[None]), view(spec, 6)[None])  # the device path, same numbers
    shifted = torch.from_numpy(spec.astype(np.float32) - 3)[None]
    assert torch.equal(SpectrogramView(train=False, norm=(3.0, 0.0))(spec), shifted)


def test_resized_frames_are_stored_with_the_size_they_had(tmp_path):
    spec = ArraySpec((2, 4, 6, 3), "uint8", frames=True, resized=True)
    meta = CacheMeta(dataset="x", pipeline="p", pipeline_params={}, classes=["a"], arrays={"v": spec.to_dict()},
                     ids=["s0", "s1"], labels=[0, 0], splits={"train": [0, 1]})
    writer = CacheWriter(tmp_path / "c", meta)
    with pytest.raises(DataError, match="'s0': v frames come without the size they were resized from"):
        writer.write(0, {"v": np.zeros((1, 4, 6, 3), np.uint8)})
    writer.write(0, {"v": SizedFrames(np.zeros((1, 4, 6, 3), np.uint8), (30, 45))})
    writer.write(1, {"v": SizedFrames(np.ones((2, 4, 6, 3), np.uint8), (12, 18))})
    writer.finish({}, {})
    cache = Cache(tmp_path / "c")
    assert cache.sources["v"].tolist() == [[30, 45], [12, 18]] and cache.counts["v"].tolist() == [1, 2]
    assert ArraySpec.from_dict(spec.to_dict()) == spec


def test_buffers_hand_an_array_out_again_only_when_nothing_uses_it():
    from mmbalance.datasets.prepared import Buffers

    pool = Buffers(keep=2)
    first = torch.from_numpy(pool.empty((4, 3), np.float32))
    view = first[1:]  # a view keeps the array in use after the tensor is gone
    del first
    second = pool.empty((4, 3), np.float32)
    assert not np.shares_memory(second, view.numpy())
    held = torch.from_numpy(second)
    del view
    again = pool.empty((4, 3), np.float32)  # the first array, free again
    assert not np.shares_memory(again, held.numpy()) and len(pool.kept[(4, 3), "<f4"]) == 2
    extra = [pool.empty((4, 3), np.float32) for _ in range(3)]  # beyond `keep`: made, not kept
    assert len(pool.kept[(4, 3), "<f4"]) == 2 and len({a.ctypes.data for a in extra}) == 3
    assert pool.empty((4, 3), np.float64).dtype == np.float64  # arrays are kept per shape and dtype
