"""The batch halves of the views (GPU augmentation), pinned to hand-computed crops and to the
per-sample views they replace."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mmbalance.datasets.batch_views import (
    FrameBatch,
    crop_resize,
    fallback_size,
    normalise_,
    random_crop_boxes,
    random_resized_boxes,
)
from mmbalance.datasets.transforms import FrameClip


def test_random_resized_boxes_fit_the_image_and_the_scale_and_ratio_ranges():
    torch.manual_seed(0)
    boxes = random_resized_boxes(2000, 60, 80)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    assert (w == w.round()).all() and (boxes == boxes.round()).all()  # whole pixels, as torchvision
    area = w * h / (60 * 80)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    # rounding w and h moves the aspect ratio a little outside [3/4, 4/3] for small boxes only
    aspect = w / h
    assert aspect.min() > 0.75 * 0.8 and aspect.max() < 4 / 3 * 1.25
    assert 0.4 < float(area.mean()) < 0.65  # uniform area in [0.08, 1], clipped where it does not fit


def test_random_resized_boxes_fall_back_to_torchvisions_central_crop():
    # a 10x40 image: no draw of scale >= 2 fits, so every box is the fallback:
    # aspect 4 > 4/3 -> height 10, width round(10 * 4/3) = 13, centred: left (40 - 13) // 2 = 13
    assert fallback_size(10, 40, (3 / 4, 4 / 3)) == (13, 10)
    boxes = random_resized_boxes(5, 10, 40, scale=(2.0, 3.0))
    assert boxes.tolist() == [[13.0, 0.0, 26.0, 10.0]] * 5
    assert fallback_size(40, 10, (3 / 4, 4 / 3)) == (10, 13)  # tall: width 10, height round(10 / 0.75)
    assert fallback_size(30, 30, (3 / 4, 4 / 3)) == (30, 30)


def test_crop_resize_is_exact_for_same_size_boxes_and_averages_when_it_shrinks():
    x = torch.rand(3, 2, 8, 8)
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    assert torch.allclose(crop_resize(x, whole, 8), x, atol=1e-6)
    # a 4x4 crop at (left 2, top 1) to 4x4: the slice itself
    box = torch.tensor([[2.0, 1.0, 6.0, 5.0]] * 3)
    assert torch.allclose(crop_resize(x, box, 4), x[..., 1:5, 2:6], atol=1e-6)
    # the whole 8x8 image to 4x4: 2x2 means, the area average
    assert torch.allclose(crop_resize(x, whole, 4), F.avg_pool2d(x, 2), atol=1e-6)


def test_random_crop_boxes_are_integer_offsets_inside_the_padded_image():
    torch.manual_seed(1)
    boxes = random_crop_boxes(500, 10, 12, 8)
    assert set(boxes[:, 0].tolist()) == set(map(float, range(5)))  # left in 0..12-8
    assert set(boxes[:, 1].tolist()) == set(map(float, range(3)))  # top in 0..10-8
    assert ((boxes[:, 2] - boxes[:, 0]) == 8).all()


def clips_uint8(b: int, t: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, t, h, w), dtype=torch.uint8)


def test_frame_batch_random_crop_and_flip_follow_the_seeded_draws():
    clips = clips_uint8(4, 2, 10, 12)
    view = FrameBatch(train=True, size=8, crop="random", mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.manual_seed(5)
    out = view(clips)
    torch.manual_seed(5)
    boxes = random_crop_boxes(4, 10, 12, 8)
    flips = torch.rand(4) < 0.5
    for i in range(4):
        left, top = int(boxes[i, 0]), int(boxes[i, 1])
        expected = clips[i, :, :, top : top + 8, left : left + 8].float() / 255  # one crop for both frames
        if flips[i]:
            expected = expected.flip(-1)
        assert torch.allclose(out[i], expected, atol=1e-6)
    assert out.shape == (4, 3, 2, 8, 8)


def test_frame_batch_at_test_time_equals_the_per_sample_view():
    arr = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # (T_slots, H, W, C)
    for size, test_crop, atol in ((16, "resize", 1e-6), (12, "center", 1e-6), (8, "resize", 0.03)):
        clip = FrameClip(train=False, frames=2, size=size, test_crop=test_crop)
        select, batch = clip.deferred()
        expected = clip(arr, 2)
        got = batch(select(arr, 2)[None])[0]
        # shrinking: the per-sample view resizes uint8 (rounds), the batch one floats; < 1 level apart
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=atol), (size, test_crop)


def test_frame_batch_noise_and_normalisation():
    clips = torch.full((2, 3, 1, 4, 4), 255, dtype=torch.uint8)
    clean = FrameBatch(train=False, size=4, mean=(0.5,) * 3, std=(0.25,) * 3)(clips)
    assert torch.allclose(clean, torch.full_like(clean, 2.0))  # (1 - 0.5) / 0.25
    noisy = FrameBatch(train=False, size=4, noise_std=0.1, noise_at_test=True, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.manual_seed(0)
    spread = noisy(torch.zeros((64, 3, 1, 4, 4), dtype=torch.uint8))
    assert math.isclose(float(spread.std()), 0.1, rel_tol=0.1)
    assert torch.allclose(normalise_(torch.ones(3, 2, 2), (0.0, 0.5, 1.0), (1.0, 0.5, 0.5))[:, 0, 0],
                          torch.tensor([1.0, 1.0, 0.0]))


def test_frame_batch_random_resized_matches_the_boxes_it_draws():
    clips = clips_uint8(3, 1, 20, 20)
    view = FrameBatch(train=True, size=10, flip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.manual_seed(3)
    out = view(clips)
    torch.manual_seed(3)
    boxes = random_resized_boxes(3, 20, 20)
    expected = crop_resize(clips[:, :, 0].float() / 255, boxes, 10)
    assert torch.allclose(out[:, :, 0], expected, atol=1e-6)
