"""The crop geometry of the frame views, pinned to torchvision's own draws and to the reference's
geometry on the original frame size, and the batch halves (GPU augmentation), pinned to
hand-computed crops and to the per-sample views they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms import v2

from mmbalance.datasets.batch_views import (
    FrameBatch,
    centre_crop_box,
    crop_resize,
    normalise_,
    on_stored,
    random_crop_box,
    resized_crop_box,
)
from mmbalance.datasets.transforms import FrameClip, crop_frames

ORIGINAL = (360, 480)  # CREMA-D's frames, which the reference crops from
STORED = (256, 341)  # what the cache keeps of them


@pytest.mark.parametrize(("height", "width", "scale"), [(360, 480, (0.08, 1.0)), (37, 91, (0.08, 1.0)),
                                                        (10, 40, (2.0, 3.0)), (40, 10, (2.0, 3.0))])
def test_resized_crop_box_is_torchvisions_get_params_draw_for_draw(height, width, scale):
    # scale >= 2 never fits: the fallback (a central crop at the clamped aspect ratio)
    image = torch.empty(0, height, width)
    for seed in range(200):
        torch.manual_seed(seed)
        ours = resized_crop_box(height, width, scale)
        torch.manual_seed(seed)
        assert ours == T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]), seed


def test_random_crop_box_is_torchvisions_random_crop_with_padding():
    for height, width in ((30, 40), (20, 12), (16, 16)):
        image = torch.arange(height * width, dtype=torch.float32).view(1, height, width) + 1
        for seed in range(30):
            torch.manual_seed(seed)
            expected = v2.RandomCrop(16, pad_if_needed=True)(image)
            torch.manual_seed(seed)
            top, left, h, w = random_crop_box(height, width, 16)
            region = (left, top, left + w, top + h)
            got = torch.from_numpy(crop_frames(image.permute(1, 2, 0).numpy()[None], [0], region))[0, ..., 0]
            assert torch.equal(got, expected[0]), (height, width, seed)


def test_centre_crop_box_is_torchvisions_center_crop():
    image = torch.arange(25 * 31, dtype=torch.float32).view(1, 25, 31)
    for size in (8, 13, 24):
        top, left, h, w = centre_crop_box(25, 31, size)
        assert torch.equal(image[:, top : top + h, left : left + w], v2.CenterCrop(size)(image))


def test_on_stored_scales_a_box_per_axis():
    assert on_stored((36, 48, 180, 240), ORIGINAL, STORED) == pytest.approx((34.1, 25.6, 204.6, 153.6))
    assert on_stored((1, 2, 3, 4), (10, 10), (10, 10)) == (2.0, 1.0, 6.0, 4.0)


def area_and_aspect(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(x1, y1, x2, y2) boxes on a height x width frame -> (area fraction, width / height)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return w * h / (height * width), w / h


def regions_on_original(clip: FrameClip, stored: tuple[int, int], source: tuple[int, int] | None,
                        n: int) -> np.ndarray:
    """n training regions of `clip` on a stored frame, seen on the original frame (scaled back)."""
    sy, sx = ORIGINAL[0] / stored[0], ORIGINAL[1] / stored[1]
    regions = np.array([clip.region(stored, source) for _ in range(n)])
    return regions * np.array([sx, sy, sx, sy])


def test_training_crops_cover_the_picture_as_torchvisions_crops_of_the_original_frame():
    n = 4000
    torch.manual_seed(1)
    reference = []
    for _ in range(n):
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(0, *ORIGINAL), [0.08, 1.0], [3 / 4, 4 / 3])
        reference.append((left, top, left + w, top + h))
    ref_area, ref_aspect = area_and_aspect(np.array(reference, dtype=float), *ORIGINAL)
    clip = FrameClip(train=True, frames=1, size=224)
    torch.manual_seed(2)  # another stream: a test of the distribution, not of the same draws
    area, aspect = area_and_aspect(regions_on_original(clip, STORED, ORIGINAL, n), *ORIGINAL)
    assert ks_2samp(area, ref_area).pvalue > 0.01 and ks_2samp(aspect, ref_aspect).pvalue > 0.01
    # the old cache: frames squashed to 224 x 224 and the box drawn there; on the original
    # picture its aspect ratios are 4/3 too wide, which the same test sees
    torch.manual_seed(2)
    _, squashed_aspect = area_and_aspect(regions_on_original(clip, (224, 224), None, n), *ORIGINAL)
    assert ks_2samp(squashed_aspect, ref_aspect).pvalue < 1e-6


def test_both_halves_of_a_frame_view_draw_the_same_region_and_flip():
    arr = np.random.default_rng(0).integers(0, 256, (4, *STORED, 3), dtype=np.uint8)
    clip = FrameClip(train=True, frames=2, size=224)
    select, _ = clip.deferred()
    for seed in range(20):
        torch.manual_seed(seed)
        draws = select(arr, 3, source=ORIGINAL).draws
        torch.manual_seed(seed)
        chosen = clip.draw(arr, 3, source=ORIGINAL)
        assert draws.tolist() == pytest.approx([*chosen.region, float(chosen.flip)])


def smooth_frame(height: int, width: int) -> np.ndarray:
    """A photo-like frame: a smooth colour field, so that resampling twice differs only a little."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    field = np.stack([np.sin(3 * x + 2 * y), np.cos(4 * y - x), np.sin(5 * x * y)], axis=-1)
    return ((field + 1) * 127.5).round().astype(np.uint8)


def test_the_per_sample_crop_matches_torchvisions_crop_of_the_original_up_to_interpolation():
    from PIL import Image

    from mmbalance.datasets.media import resize_image

    original = smooth_frame(*ORIGINAL)
    stored = resize_image(original, STORED)[None]
    clip = FrameClip(train=True, frames=1, size=224, flip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = clip(stored, 1, source=ORIGINAL)[:, 0]
        torch.manual_seed(seed)
        torch.rand(())  # the draw FrameClip makes first: which of the clip's frames
        crop = T.RandomResizedCrop(224)(Image.fromarray(original))  # the reference, from the original jpg
        reference = T.ToTensor()(crop)
        assert float((ours - reference).abs().mean()) < 2 / 255, seed


def test_crop_frames_pads_with_zeros_outside_the_frame():
    arr = np.arange(1, 2 * 4 * 5 + 1, dtype=np.uint8).reshape(2, 4, 5, 1)
    inside = crop_frames(arr, [1], (1.0, 1.0, 3.0, 4.0))
    assert np.array_equal(inside, arr[[1], 1:4, 1:3])
    outside = crop_frames(arr, [0], (-1.0, 2.0, 2.0, 6.0))[0, ..., 0]
    assert outside.shape == (4, 3)
    assert np.array_equal(outside[:2, 1:], arr[0, 2:4, 0:2, 0]) and outside[2:].sum() == 0 and outside[:, 0].sum() == 0


def test_crop_resize_is_exact_for_same_size_boxes_and_averages_when_it_shrinks():
    x = torch.rand(3, 2, 8, 8)
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    assert torch.allclose(crop_resize(x, whole, 8), x, atol=1e-6)
    # a 4x4 crop at (left 2, top 1) to 4x4: the slice itself
    box = torch.tensor([[2.0, 1.0, 6.0, 5.0]] * 3)
    assert torch.allclose(crop_resize(x, box, 4), x[..., 1:5, 2:6], atol=1e-6)
    # the whole 8x8 image to 4x4: 2x2 means, the area average
    assert torch.allclose(crop_resize(x, whole, 4), F.avg_pool2d(x, 2), atol=1e-6)


def clips_uint8(b: int, t: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8)  # as FrameSelect leaves them


def test_frame_batch_random_crop_and_flip_follow_the_draws():
    clips = clips_uint8(4, 2, 10, 12)
    view = FrameBatch(train=True, size=8, crop="random", mean=(0.0,) * 3, std=(1.0,) * 3)
    draws = torch.tensor([[0, 0, 8, 8, 0], [4, 2, 12, 10, 1], [1, 1, 9, 9, 1], [2, 0, 10, 8, 0]], dtype=torch.float32)
    out = view(clips, draws)
    assert out.shape == (4, 3, 2, 8, 8)
    for i, (left, top, _, _, flip) in enumerate(draws.int().tolist()):
        expected = clips[i, :, top : top + 8, left : left + 8].permute(3, 0, 1, 2).float() / 255  # both frames
        assert torch.allclose(out[i], expected.flip(-1) if flip else expected, atol=1e-6)


def test_frame_batch_at_test_time_equals_the_per_sample_view():
    arr = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # (T_slots, H, W, C)
    for size, test_crop, atol in ((16, "resize", 1e-6), (12, "center", 1e-6), (8, "resize", 0.03)):
        clip = FrameClip(train=False, frames=2, size=size, test_crop=test_crop)
        select, batch = clip.deferred()
        expected = clip(arr, 2)
        frames, draws = select(arr, 2)
        got = batch(frames[None], draws[None])[0]
        # shrinking: the per-sample view resizes uint8 (rounds), the batch one floats; < 1 level apart
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=atol), (size, test_crop)


def test_frame_batch_noise_and_normalisation():
    clips = torch.full((2, 1, 4, 4, 3), 255, dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 4.0, 4.0, 0.0]] * 2)
    clean = FrameBatch(train=False, size=4, mean=(0.5,) * 3, std=(0.25,) * 3)(clips, whole)
    assert torch.allclose(clean, torch.full_like(clean, 2.0))  # (1 - 0.5) / 0.25
    noisy = FrameBatch(train=False, size=4, noise_std=0.1, noise_at_test=True, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.manual_seed(0)
    spread = noisy(torch.zeros((64, 1, 4, 4, 3), dtype=torch.uint8), whole[:1].repeat(64, 1))
    assert math.isclose(float(spread.std()), 0.1, rel_tol=0.1)
    assert torch.allclose(normalise_(torch.ones(3, 2, 2), (0.0, 0.5, 1.0), (1.0, 0.5, 0.5))[:, 0, 0],
                          torch.tensor([1.0, 1.0, 0.0]))


def test_frame_batch_random_resized_resamples_the_drawn_regions():
    clips = clips_uint8(3, 1, 20, 20)
    view = FrameBatch(train=True, size=10, flip=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    draws = torch.tensor([[0.5, 1.25, 13.0, 19.0, 0.0], [0, 0, 20, 20, 0], [3, 4, 8, 9, 1]], dtype=torch.float32)
    out = view(clips, draws)
    expected = crop_resize(clips[:, 0].permute(0, 3, 1, 2).float() / 255, draws[:, :4], 10)
    assert torch.allclose(out[:, :, 0], expected, atol=1e-6)


def test_frames_not_resized_get_torchvisions_crop_and_flip_exactly():
    # without a source size the stored frame is the original: the view is torchvision's
    # RandomResizedCrop + horizontal flip on the uint8 frames, draw for draw and value for value
    arr = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    clip = FrameClip(train=True, frames=2, size=24)
    mean, std = torch.tensor(clip.mean).view(3, 1, 1), torch.tensor(clip.std).view(3, 1, 1)
    for seed in range(30):
        torch.manual_seed(seed)
        ours = clip(arr, 3)
        torch.manual_seed(seed)
        frames = torch.from_numpy(arr[clip.indices(3)]).permute(0, 3, 1, 2)
        x = v2.RandomResizedCrop(24, antialias=True)(frames)
        if float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        expected = ((x.float() / 255 - mean) / std).permute(1, 0, 2, 3)
        assert torch.equal(ours, expected), seed


def test_resize_uint8_is_torchvisions_antialiased_resize_also_when_it_enlarges_without_antialiasing():
    from mmbalance.datasets.transforms import resize_uint8

    for h, w in ((30, 40), (12, 20), (20, 33), (64, 64), (7, 90)):
        x = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels last, as cropped
        assert torch.equal(resize_uint8(x, 32), v2.functional.resize(x, [32, 32], antialias=True)), (h, w)
