"""UCF101 split 1: 13,320 action videos of 101 classes, seen as RGB frames and TV-L1 optical flow.

Raw download as users have it (the official split lists plus Feichtenhofer's pre-extracted
`ucf101_jpegs_256` and `ucf101_tvl1_flow` archives, which DI-MML's README points to)::

    RAW/ucfTrainTestlist/classInd.txt          "1 ApplyEyeMakeup"
    RAW/ucfTrainTestlist/trainlist01.txt       "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    RAW/ucfTrainTestlist/testlist01.txt        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    RAW/jpegs_256/v_<Class>_gXX_cYY/frame000001.jpg ...          RGB, 256 px high
    RAW/tvl1_flow/{u,v}/v_<Class>_gXX_cYY/frame000001.jpg ...    grey; 127.5 = no motion

Split: the official split 1 (9,537 train / 3,783 test; test labels come from the class folder of
each line, as classInd names it). There is no validation split: 10% of train is carved per class
with seed 0 (our choice; DI-MML and BalanceBenchmark select on test). Classes follow classInd
order (BalanceBenchmark sorts the names case-sensitively, which swaps a few labels; a relabelling
changes no result). Modalities are named `rgb` and `flow`.

A video has 100-300 frames, too many to cache whole, so a prepare keeps a few *temporal
positions* per video and training samples among them:

  dimml (default)  DI-MML. Flow: 3 windows of 10 consecutive u/v frames (the first, the centre
      and the last window, evenly spaced; the centre one is DI-MML's test window, offset
      n//2 - 5 over the n flow frames), stored as 256 x 340 x 2. RGB: in each window the frame
      DI-MML's seeded choice picks (position 6 of 10), 256 x 340 x 3. Frames are kept whole as
      the archives have them, 340 x 256 (another size is resized to a 256-px short side and
      centre-cropped to 340 wide), so training random-crops 224 anywhere in the frame and test
      centre-crops 224, both exactly DI-MML's crops.
      Training draws one of the 3 windows (DI-MML's offset is random in the paper but fixed by
      np.random.seed(999) in the code) and one of the 3 RGB frames, random crop, flip; test
      takes the centre window and its RGB frame, centre crop.
      Flow -> (2, 10, 224, 224) on the 0-255 scale minus 127.5 (no division: DI-MML's code);
      RGB -> (3, 1, 224, 224), (x255 - mean) / std with DI-MML's train statistics (106.46,
      101.47, 93.22) / (68.28, 66.41, 67.59). The released code normalises val/test with the
      test split's own statistics: set `rgb_stats=per_split` to reproduce that.
  balancebench  BalanceBenchmark: 6 evenly spaced RGB frames and 6 evenly spaced u/v pairs (the
      centres of 6 equal segments), each resized to 224 x 224 (aspect not kept, as its
      Resize((224, 224))); 3 of each by segment sampling (a random one of each third in
      training, the centres at test), flip; ImageNet normalisation for RGB, none for flow
      ([0, 1]). BalanceBenchmark reads its own 6-frame RGB folders and picks flow among all
      frames; 6 stored candidates of each stand for them.

Deliberate differences from the reference code, besides the candidate positions above:
  * the two streams are transformed independently (their own window, crop and flip draws);
    DI-MML shares window, crop and flip between RGB and flow;
  * a horizontal flip mirrors u and v and negates u (u -> 255 - u), which is what a mirrored
    motion field is. `flow_flip=reference` reproduces the codes instead: DI-MML mirrors u only
    (v is left unmirrored, u not negated); BalanceBenchmark mirrors each u and v image on its
    own coin;
  * videos with fewer than 10 flow frames repeat their last frame (DI-MML raises an error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.media import read_image, resize_image
from mmbalance.datasets.prepared import CachedParams, Pipeline, Plan, PreparedDataset, SampleSource, View
from mmbalance.datasets.splits import carve_val, load_manifest
from mmbalance.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, FrameClip

LISTS = "ucfTrainTestlist"
SPLIT_FILES = ("classInd.txt", "trainlist01.txt", "testlist01.txt")
SHORT_SIDE = 256  # jpegs_256 / tvl1_flow frames are 256 px high
FULL_FRAME = (SHORT_SIDE, 340)  # (height, width) of those frames: UCF101's 320 x 240 at a 256-px short side
FLAVOUR = "split1"
VIDEO = re.compile(r"^v_[A-Za-z0-9]+_g\d+_c\d+$")

# DI-MML's RGB statistics on the 0-255 scale (its ucf101_mean_std)
DIMML_TRAIN_MEAN = (106.46409, 101.46796, 93.22408)
DIMML_TRAIN_STD = (68.28274, 66.40727, 67.58706)
DIMML_TEST_MEAN = (108.639244, 103.3139, 95.21823)
DIMML_TEST_STD = (67.80855, 65.88047, 67.68048)


class Ucf101Pipeline(Pipeline):
    layout: Literal["windows", "segments"]  # what the cache keeps per video (module docstring)
    stored_hw: tuple[int, int]  # (height, width) of the cached frames
    windows: int = 3  # windows layout: flow windows (odd, so that one is the centre window)
    clip_len: int = 10  # windows layout: consecutive flow frames per window
    rgb_in_window: int = 6  # windows layout: the RGB frame's position in its window
    candidates: int = 6  # segments layout: evenly spaced frames kept per stream
    rgb_frames: int  # frames per sample at training/test time
    flow_frames: int
    crop: Literal["random", "random_resized"] = "random"
    test_crop: Literal["center", "resize"]
    rgb_mean: tuple[float, float, float]  # 0-255 scale
    rgb_std: tuple[float, float, float]
    rgb_test_mean: tuple[float, float, float] | None = None  # the reference code's val/test stats
    rgb_test_std: tuple[float, float, float] | None = None
    flow_mean: float  # 0-255 scale, both channels
    flow_std: float
    reference_flip: Literal["u_only", "independent"]  # the code's flow flip (flow_flip=reference)


PIPELINES = {
    "dimml": Ucf101Pipeline(
        description="DI-MML: flow 2x10 frames minus 127.5, 1 RGB frame with UCF statistics, crop 224 of 256x340",
        flavour=FLAVOUR, layout="windows", stored_hw=FULL_FRAME, rgb_frames=1, flow_frames=10, test_crop="center",
        rgb_mean=DIMML_TRAIN_MEAN, rgb_std=DIMML_TRAIN_STD, rgb_test_mean=DIMML_TEST_MEAN,
        rgb_test_std=DIMML_TEST_STD, flow_mean=127.5, flow_std=1.0, reference_flip="u_only"),
    "balancebench": Ucf101Pipeline(
        description="BalanceBenchmark: 3 RGB frames (ImageNet norm) and 3 u/v pairs ([0, 1]), resized 224",
        flavour=FLAVOUR, layout="segments", stored_hw=(224, 224), rgb_frames=3, flow_frames=3, test_crop="resize",
        rgb_mean=tuple(255 * m for m in IMAGENET_MEAN), rgb_std=tuple(255 * s for s in IMAGENET_STD),
        flow_mean=0.0, flow_std=255.0, reference_flip="independent"),
}


class Ucf101Params(CachedParams):
    pipeline: Literal["dimml", "balancebench"] | None = None
    frame_size: int = Field(224, ge=8)
    # dimml: normalise val/test RGB with DI-MML's train statistics (default) or, as its released
    # code does, with the test split's own
    rgb_stats: Literal["train", "per_split"] = "train"
    # negate_u: mirror u and v and negate u; reference: the pipeline's code (module docstring)
    flow_flip: Literal["negate_u", "reference"] = "negate_u"


@DATASETS.register("ucf101")
class Ucf101(PreparedDataset):
    Params = Ucf101Params
    MODALITIES = ("rgb", "flow")
    KINDS: ClassVar = {"rgb": "video", "flow": "video"}
    DEFAULT_ENCODERS: ClassVar = {"rgb": {"name": "resnet18"}, "flow": {"name": "resnet18"}}
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "dimml"

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: Ucf101Pipeline) -> Plan:
        _require_layout(raw)
        lists = raw / LISTS
        classes = read_class_ind(lists / "classInd.txt")
        train = read_split_list(lists / "trainlist01.txt", classes, labelled=True)
        test = read_split_list(lists / "testlist01.txt", classes, labelled=False)
        labels = train | test
        flavour = load_manifest("ucf101").flavour(pipeline.flavour)
        train_ids, val_ids = carve_val(list(train), [train[v] for v in train], flavour.val)
        samples = [
            SampleSource(v, labels[v], {
                "rgb": raw / "jpegs_256" / v,
                "u": raw / "tvl1_flow" / "u" / v,
                "v": raw / "tvl1_flow" / "v" / v,
            })
            for v in train_ids + val_ids + list(test)
        ]
        notes = [] if len(classes) == 101 else [f"classInd.txt names {len(classes)} classes (UCF101 has 101)"]
        return Plan(classes, samples, {"train": train_ids, "val": val_ids, "test": list(test)}, FLAVOUR, notes)

    @classmethod
    def array_specs(cls, pipeline: Ucf101Pipeline) -> dict[str, ArraySpec]:
        hw = pipeline.stored_hw
        if pipeline.layout == "windows":
            w = pipeline.windows
            return {"rgb": ArraySpec((w, *hw, 3), "uint8"),
                    "flow": ArraySpec((w, pipeline.clip_len, *hw, 2), "uint8")}
        k = pipeline.candidates
        return {"rgb": ArraySpec((k, *hw, 3), "uint8"), "flow": ArraySpec((k, *hw, 2), "uint8")}

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: Ucf101Pipeline) -> dict[str, np.ndarray]:
        files = source.files
        n_flow = count_frames(files["u"])
        if pipeline.layout == "windows":
            starts = window_starts(n_flow, pipeline.windows, pipeline.clip_len)
            flow = np.stack([
                read_flow(files["u"], files["v"], [min(s + t, n_flow - 1) for t in range(pipeline.clip_len)], pipeline)
                for s in starts
            ])
            rgb_idx = [min(s + pipeline.rgb_in_window, n_flow - 1) for s in starts]  # DI-MML indexes RGB by flow count
            return {"rgb": read_rgb(files["rgb"], rgb_idx, pipeline), "flow": flow}
        k = pipeline.candidates
        return {
            "rgb": read_rgb(files["rgb"], segment_centres(count_frames(files["rgb"]), k), pipeline),
            "flow": read_flow(files["u"], files["v"], segment_centres(n_flow, k), pipeline),
        }

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        mean, std = pipe.rgb_mean, pipe.rgb_std
        if p.rgb_stats == "per_split":
            if pipe.rgb_test_mean is None:
                raise ConfigError(f"dataset.rgb_stats=per_split: pipeline {self.params.pipeline!r} has no "
                                  f"per-split RGB statistics; allowed with pipeline dimml only")
            if not train:
                mean, std = pipe.rgb_test_mean, pipe.rgb_test_std
        # RGB: one (dimml) or 3 (balancebench) of the stored frames by segment sampling
        rgb = FrameClip(train, pipe.rgb_frames, p.frame_size, "segments", pipe.crop, pipe.test_crop,
                        mean=tuple(m / 255 for m in mean), std=tuple(s / 255 for s in std))
        flow_sampling = "window" if pipe.layout == "windows" else "segments"
        flow = FrameClip(train, pipe.flow_frames, p.frame_size, flow_sampling, pipe.crop, pipe.test_crop, flip=False,
                         mean=(pipe.flow_mean / 255,) * 2, std=(pipe.flow_std / 255,) * 2)
        flip = "negate_u" if p.flow_flip == "negate_u" else pipe.reference_flip
        return {"rgb": rgb, "flow": FlowClip(flow, windowed=pipe.layout == "windows", flip=flip)}


@dataclass(frozen=True)
class FlowClip:
    """u/v flow frames -> (2, k, size, size): `clip` (a FrameClip built with flip=False) samples,
    crops and normalises; this adds the window choice and a flow-aware horizontal flip.

    Stored rows are (N, T, H, W, 2): N windows when `windowed` (a random window in training, the
    centre one at test) or (T, H, W, 2) frames. Flips (training only, p = 0.5):
    negate_u mirrors both channels and maps u to 255 - u (a mirrored motion field);
    u_only mirrors u alone (DI-MML's code); independent mirrors every u and v image on its own
    coin (BalanceBenchmark's code).
    """

    clip: FrameClip
    windowed: bool
    flip: Literal["negate_u", "u_only", "independent"] = "negate_u"

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        return self.clip.shape(stored[1:] if self.windowed else stored)

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        if self.windowed:
            w = int(torch.randint(0, len(arr), ())) if self.clip.train else len(arr) // 2
            arr, count = arr[w], None
        x = self.clip(arr, count)
        return self._flip(x) if self.clip.train else x

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip == "independent":
            coins = torch.rand(x.shape[:2]) < 0.5  # one per channel and frame
            return torch.where(coins[:, :, None, None], x.flip(-1), x)
        if float(torch.rand(())) >= 0.5:
            return x
        if self.flip == "u_only":
            x = x.clone()
            x[0] = x[0].flip(-1)
            return x
        x = x.flip(-1)
        # u -> 1 - u on the [0, 1] scale, written in the normalised values y = (u - m) / s
        m, s = self.clip.mean[0], self.clip.std[0]
        x[0] = (1 - 2 * m) / s - x[0]
        return x


# ---- split files ---------------------------------------------------------------------------------


def _require_layout(raw: Path) -> None:
    missing = [str(raw / LISTS / f) for f in SPLIT_FILES if not (raw / LISTS / f).is_file()]
    missing += [str(raw / d) for d in ("jpegs_256", "tvl1_flow/u", "tvl1_flow/v") if not (raw / d).is_dir()]
    if missing:
        raise DataError(
            f"ucf101: {', '.join(missing)} not found; --raw must hold ucfTrainTestlist/ (classInd.txt, "
            f"trainlist01.txt, testlist01.txt), jpegs_256/ and tvl1_flow/u, tvl1_flow/v"
        )


def _lines(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8-sig")  # the official lists have CRLF line ends
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_ind(path: Path) -> list[str]:
    """Class names in label order from classInd.txt (`1 ApplyEyeMakeup`, numbered 1..N)."""
    classes = []
    for n, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise DataError(f"{str(path)!r} line {n}: {line!r} is not '<index> <ClassName>' with index "
                            f"{len(classes) + 1}")
        classes.append(parts[1])
    if not classes:
        raise DataError(f"{str(path)!r} names no classes")
    return classes


def read_split_list(path: Path, classes: list[str], labelled: bool) -> dict[str, int]:
    """Video id -> label (0-based) of a trainlist (`Class/v_..._gXX_cYY.avi 1`) or testlist file
    (no label: the class folder's classInd index). A listed label must agree with the folder's;
    test lists may carry one (DI-MML's testlist001.txt appends them)."""
    index = {c: i for i, c in enumerate(classes)}
    folded = {c.lower(): i for i, c in enumerate(classes)}
    out: dict[str, int] = {}
    for n, line in _lines(path):
        parts = line.split()
        folder, _, name = parts[0].partition("/")
        video = name.removesuffix(".avi")
        label = index.get(folder, folded.get(folder.lower()))
        arity_ok = len(parts) == 2 if labelled else len(parts) in (1, 2)
        if not VIDEO.match(video) or label is None or not arity_ok:
            raise DataError(f"{str(path)!r} line {n}: {line!r} is not '<Class>/v_<Class>_gXX_cYY.avi"
                            f"{' <label>' if labelled else ''}' with a class of classInd.txt")
        if len(parts) == 2 and (not parts[1].isdigit() or int(parts[1]) - 1 != label):
            raise DataError(f"{str(path)!r} line {n}: label {parts[1]} disagrees with classInd.txt, "
                            f"which numbers {folder} {label + 1}")
        if video in out:
            raise DataError(f"{str(path)!r} line {n}: video {video} is listed twice")
        out[video] = label
    return out


# ---- frames --------------------------------------------------------------------------------------


def count_frames(folder: Path) -> int:
    """How many frame*.jpg a video folder holds (frames are numbered from frame000001.jpg)."""
    n = sum(1 for _ in folder.glob("frame*.jpg"))
    if n == 0:
        raise DataError(f"frame folder {str(folder)!r} holds no frame*.jpg")
    return n


def frame_path(folder: Path, index: int) -> Path:
    """The file of 0-based frame `index`."""
    return folder / f"frame{index + 1:06d}.jpg"


def window_starts(n: int, windows: int, clip_len: int) -> list[int]:
    """0-based first frames of `windows` evenly spaced windows of `clip_len` out of `n` frames;
    the middle one is floor((n - clip_len) / 2) = n // 2 - clip_len // 2, DI-MML's test window."""
    slack = max(n - clip_len, 0)
    return [w * slack // (windows - 1) for w in range(windows)] if windows > 1 else [slack // 2]


def segment_centres(n: int, k: int) -> list[int]:
    """The centre frame of each of k equal segments of n frames."""
    return [min(int((i + 0.5) * n / k), n - 1) for i in range(k)]


def fit_frame(img: np.ndarray, pipeline: Ucf101Pipeline) -> np.ndarray:
    """One frame at the cached geometry: windows layout = short side 256, then the centre
    stored_hw (torchvision's centre-crop rounding; the whole frame for the archives' 340 x 256);
    segments = squashed to stored_hw, as BalanceBenchmark's Resize((224, 224))."""
    sh, sw = pipeline.stored_hw
    if pipeline.layout == "segments":
        return resize_image(img, (sh, sw))
    h, w = img.shape[:2]
    if min(h, w) != SHORT_SIDE:
        h, w = (SHORT_SIDE, round(w * SHORT_SIDE / h)) if h <= w else (round(h * SHORT_SIDE / w), SHORT_SIDE)
        img = resize_image(img, (h, w))
    if h < sh or w < sw:
        raise DataError(f"ucf101: a frame of {w} x {h} at a {SHORT_SIDE}-px short side is smaller than the "
                        f"{sw} x {sh} the cache keeps (a portrait video?)")
    top, left = int(round((h - sh) / 2)), int(round((w - sw) / 2))
    return img[top : top + sh, left : left + sw]


def read_rgb(folder: Path, indices: list[int], pipeline: Ucf101Pipeline) -> np.ndarray:
    return np.stack([fit_frame(read_image(frame_path(folder, i)), pipeline) for i in indices])


def read_flow(u_dir: Path, v_dir: Path, indices: list[int], pipeline: Ucf101Pipeline) -> np.ndarray:
    """(len(indices), S, S, 2) uint8: u and v of each frame as two channels."""
    return np.stack([
        np.stack([fit_frame(read_image(frame_path(d, i), mode="L"), pipeline) for d in (u_dir, v_dir)], axis=-1)
        for i in indices
    ])
