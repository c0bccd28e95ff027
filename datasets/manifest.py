"""`manifest`: your own dataset, described by one CSV file (no code to write).

Raw layout: a CSV (`--raw path/to/file.csv`, or `--raw DIR` holding `DIR/manifest.csv`) with a
header line and one row per sample::

    id,label,split,audio,image
    s001,dog,train,clips/s001.wav,photos/s001.png
    s002,cat,test,clips/s002.flac,photos/s002.jpg

* `id` (required): unique per row;
* `label` (required): a class name or an integer; classes are the sorted unique labels (sorted
  as numbers when every label is an integer), and a label's class index is its position there;
* `split` (optional): train, val or test;
* every other column is one modality (its name: letters, digits, `_`), each cell a file path,
  relative paths resolved against the CSV's folder. A column holds one kind of file, told by its
  extension: audio (.wav .flac .ogg), image (.jpg .jpeg .png), video (.mp4 .avi .mkv .webm
  .flv; frames only, the audio track is not read) or vector (.npy, one shape per column).

Every mistake in the file (missing column, empty cell, duplicate id, unknown split, unknown or
mixed extensions, a non-integer number as label, npy shapes that differ) is reported by line
(1-based, the header is line 1) and column, all of them together in one DataError. Missing or
unreadable files are not CSV mistakes: `mmbalance prepare` reports them by path like for every
other dataset.

Splits: the `split` column when present (with only train and test rows, 10% of train is carved
as val, per class, seed 0); without one, train/val/test = 70/10/20 carved per class with seed 0
(test first, then val from the rest). What was carved is in the prepare report's notes.

Pipelines:
  default  audio: 16 kHz, Kaldi fbank 128 mel bins x 1024 frames (10 ms), as MLA's;
           images: 224x224 (T=1); videos: 1-fps frames, up to 10 kept (evenly spaced) at
           224x224, 3 used per clip in training (random within 3 segments, segment centres at
           test); npy: stored float16 as-is, read as float32 of the stored shape
  small    fbank 64 x 128 frames, images and videos at 64x64, for quick CPU runs
Frames are resized to squares (aspect ratio not kept), as the reference repos' loaders do.

datasets/manifest_csv.py reads and checks the CSV; this module turns the checked table into
splits, cached arrays and training views.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from mmbalance.core.errors import ConfigError, DataError, DataWarning
from mmbalance.core.registry import DATASETS
from mmbalance.core.types import ModalityKind
from mmbalance.datasets import audio as fe
from mmbalance.datasets.cache import ArraySpec, CacheMeta, read_meta
from mmbalance.datasets.manifest_csv import FLOAT16_MAX, SPLIT_VALUES, ManifestTable, lines_of, odd_labels, read_table
from mmbalance.datasets.media import clip_frames, read_audio, read_image, resize_image
from mmbalance.datasets.prepared import CachedParams, Pipeline, Plan, PreparedDataset, SampleSource, View
from mmbalance.datasets.splits import ValCarving, carve_val, load_manifest
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

TEST_FRACTION = 0.2  # without a split column: 70/10/20
VAL_FRACTION = 0.1
CARVING_SEED = 0


class ManifestPipeline(Pipeline):
    sample_rate: int = 16000
    mel_bins: int = 128
    audio_frames: int = 1024  # 10 ms each
    frame_size: int = 224  # stored frames are square
    frame_slots: int = 10  # video frames kept per clip (1 fps, evenly spaced beyond that)
    frames: int = 3  # video frames per clip at training time


PIPELINES = {
    "default": ManifestPipeline(description="fbank 128x1024 at 16 kHz; frames 224x224, 3 per video",
                                flavour="own"),
    "small": ManifestPipeline(description="fbank 64x128 at 16 kHz; frames 64x64, 3 per video (quick CPU runs)",
                              flavour="own", mel_bins=64, audio_frames=128, frame_size=64),
}


class ManifestParams(CachedParams):
    pipeline: Literal["default", "small"] | None = None
    frames: int | None = Field(None, ge=1)  # video frames per clip; default: the pipeline's
    frame_size: int | None = Field(None, ge=8)  # frame side at training time; default: as stored
    # the modalities to train on (a check, and a choice of a subset); default: every CSV column
    modalities: list[str] | None = None


# ---- splits -------------------------------------------------------------------------------------


def split_lists(table: ManifestTable, val: ValCarving) -> tuple[dict[str, list[str]], list[str]]:
    """(split -> ids, notes on what was carved) from the split column, or carved 70/10/20."""
    labels = {r.id: table.label_index[r.label] for r in table.rows}
    if not table.has_split:
        ids = [r.id for r in table.rows]
        rest, test = _carve(ids, labels, ValCarving(fraction=TEST_FRACTION, seed=CARVING_SEED), table, "test")
        share = VAL_FRACTION / (1 - TEST_FRACTION)
        train, val = _carve(rest, labels, ValCarving(fraction=share, seed=CARVING_SEED), table, "val")
        note = (f"no split column: carved train/val/test = 70/10/20 per class with seed {CARVING_SEED} "
                f"({len(train)}/{len(val)}/{len(test)} of {len(ids)} rows)")
        return {"train": train, "val": val, "test": test}, [note]
    splits = {s: [r.id for r in table.rows if r.split == s] for s in SPLIT_VALUES}
    if splits["val"]:
        return splits, []
    train, carved = _carve(splits["train"], labels, val, table, "val")
    note = (f"split column has no val rows: carved {len(carved)} of {len(splits['train'])} train rows "
            f"({val.fraction:.0%}) per class with seed {val.seed} as val")
    return {"train": train, "val": carved, "test": splits["test"]}, [note]


def classes_without_training_rows(table: ManifestTable, splits: dict[str, list[str]]) -> list[str]:
    """One warning per class that has rows but none in train: no model can learn it."""
    split_of = {sid: name for name, ids in splits.items() for sid in ids}
    found = []
    for label in sorted({r.label for r in table.rows}, key=lambda lab: table.label_index[lab]):
        rows = [r for r in table.rows if r.label == label]
        where = sorted({split_of.get(r.id, "no split") for r in rows})
        if "train" not in where:
            found.append(f"class {label!r} has no training rows: its {len(rows)} row(s) are in "
                         f"{' and '.join(where)} ({lines_of(rows)}); no model can learn it")
    return found


def _carve(ids: list[str], labels: dict[str, int], carving: ValCarving, table: ManifestTable,
           what: str) -> tuple[list[str], list[str]]:
    try:
        return carve_val(ids, [labels[i] for i in ids], carving)
    except DataError as e:
        fix = "give some rows split val" if table.has_split else "add a split column with train, val and test rows"
        raise DataError(f"manifest CSV {str(table.path)!r}: too few rows to carve {what} "
                        f"({carving.fraction:.0%} of {len(ids)}): {e}; {fix}") from e


# ---- decoding one sample ------------------------------------------------------------------------


def array_spec(kind: ModalityKind, pipeline: ManifestPipeline, shape: tuple[int, ...] = ()) -> ArraySpec:
    """What the cache stores per row for a column of this kind."""
    side = pipeline.frame_size
    if kind == "audio":
        return ArraySpec((pipeline.audio_frames, pipeline.mel_bins), "float16")
    if kind == "image":
        return ArraySpec((1, side, side, 3), "uint8", frames=True)
    if kind == "video":
        return ArraySpec((pipeline.frame_slots, side, side, 3), "uint8", frames=True)
    return ArraySpec(shape or (1,), "float16")  # a 0-d array is stored as one value


def decode(path: Path, kind: ModalityKind, pipeline: ManifestPipeline) -> np.ndarray:
    """One file -> the array its column stores."""
    if kind == "audio":
        wave, sr = read_audio(path)
        x = fe.resample(torch.from_numpy(wave), sr, pipeline.sample_rate)
        fbank = fe.kaldi_fbank(x, pipeline.sample_rate, pipeline.mel_bins, pipeline.audio_frames)
        return fbank.numpy().astype(np.float16)
    side = (pipeline.frame_size, pipeline.frame_size)
    if kind == "image":
        return resize_image(read_image(path), side)[None]
    if kind == "video":
        return clip_frames(path, pipeline.frame_slots, pipeline.frame_size, "spaced")
    return read_vector(path)


def read_vector(path: Path) -> np.ndarray:
    """An .npy array as float16; non-numeric arrays and values beyond float16's range are errors."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read npy file {str(path)!r}: {e}") from e
    if arr.dtype.kind not in "biuf":
        raise DataError(f"npy file {str(path)!r} holds {arr.dtype} values; allowed: bool, integer or float")
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else True
    if np.any(np.abs(np.where(finite, arr, 0)) > FLOAT16_MAX):
        raise DataError(f"npy file {str(path)!r} holds values beyond float16's range (|x| > {FLOAT16_MAX:g}); "
                        "the cache stores float16, so scale them first")
    return np.atleast_1d(arr).astype(np.float16)


# ---- training-time views ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayView:
    """A stored float16 array -> float32 tensor of the same shape (npy columns)."""

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return tuple(stored)

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))


# ---- the dataset --------------------------------------------------------------------------------


@DATASETS.register("manifest")
class Manifest(PreparedDataset):
    """Your own data from a CSV (id, label, [split], one file-path column per modality)."""

    Params = ManifestParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "default"
    ENCODER_OF_KIND: ClassVar[dict[str, dict[str, Any]]] = {
        "audio": {"name": "resnet18"}, "image": {"name": "resnet18"},
        "video": {"name": "resnet18"}, "vector": {"name": "mlp"},
    }

    # ---- config validation: modalities come from the prepared cache -----------------------------

    @classmethod
    def cache_meta(cls, params: BaseModel) -> CacheMeta:
        """meta.json of the cache at `params.root` (or the default root), for config validation."""
        given = getattr(params, "root", None)
        root = Path(given).expanduser() if given else cls.default_root(getattr(params, "pipeline", None))
        key = "dataset.root" if given else "dataset.root, unset, so the default"
        if not (root / "meta.json").is_file():
            raise ConfigError(
                f"dataset 'manifest' takes its modalities from a prepared cache, and {str(root)!r} ({key}) holds "
                f"none; run `mmbalance prepare manifest --raw CSV --out DIR` first and set dataset.root=DIR"
            )
        try:
            meta = read_meta(root)
        except DataError as e:
            raise ConfigError(f"{e} (dataset.root)") from None
        if meta.dataset != cls.registry_name:
            raise ConfigError(f"{str(root)!r} (dataset.root) holds a cache of dataset {meta.dataset!r}, not 'manifest'")
        return meta

    @classmethod
    def modality_names(cls, params: BaseModel | None = None) -> tuple[str, ...]:
        if params is None:
            return ()
        available = list(cls.cache_meta(params).kinds)
        chosen = getattr(params, "modalities", None)
        if chosen is None:
            return tuple(available)
        unknown = [m for m in chosen if m not in available]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            what = "unknown " + ", ".join(map(repr, unknown)) if unknown else "empty or repeated"
            raise ConfigError(f"dataset.modalities={chosen!r}: {what}; "
                              f"the cache's modalities (its CSV columns): {', '.join(available)}")
        return tuple(chosen)

    @classmethod
    def default_encoder(cls, modality: str, params: BaseModel | None = None) -> dict[str, Any]:
        kind = cls.cache_meta(params).kinds.get(modality, "vector") if params is not None else "vector"
        return dict(cls.ENCODER_OF_KIND[kind])

    # ---- prepare ------------------------------------------------------------------------------

    @classmethod
    def plan(cls, raw: Path, pipeline: ManifestPipeline) -> Plan:
        table = read_table(raw)
        flavour = load_manifest("manifest").flavour(pipeline.flavour)
        splits, notes = split_lists(table, flavour.val or ValCarving(fraction=VAL_FRACTION, seed=CARVING_SEED))
        for warning in [*odd_labels(table.rows), *classes_without_training_rows(table, splits)]:
            warnings.warn(f"manifest CSV {str(table.path)!r}: {warning}", DataWarning, stacklevel=2)
            notes.append(f"warning: {warning}")
        extra = {"kinds": dict(table.kinds)}
        samples = [SampleSource(r.id, table.label_index[r.label], dict(r.files), extra) for r in table.rows]
        arrays = {m: array_spec(k, pipeline, table.shapes.get(m, ())) for m, k in table.kinds.items()}
        notes.append(f"{str(table.path)!r}: {len(table.rows)} rows, {len(table.classes)} classes, modalities "
                     + ", ".join(f"{m} ({k})" for m, k in table.kinds.items()))
        return Plan(table.classes, samples, splits, pipeline.flavour, notes, arrays=arrays, kinds=dict(table.kinds))

    @classmethod
    def array_specs(cls, pipeline: ManifestPipeline) -> dict[str, ArraySpec]:
        raise DataError("manifest: the cached arrays depend on the CSV's columns; they come from plan()")

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: ManifestPipeline) -> dict[str, np.ndarray]:
        kinds = source.extra["kinds"]
        return {m: decode(path, kinds[m], pipeline) for m, path in source.files.items()}

    # ---- training -----------------------------------------------------------------------------

    def views(self, train: bool) -> dict[str, View]:
        p, pipe = self.params, self.pipeline(self.params.pipeline)
        kinds = self.cache.meta.kinds
        size = p.frame_size or pipe.frame_size
        views: dict[str, View] = {}
        for m in p.modalities or kinds:
            kind = kinds[m]
            if kind == "audio":
                views[m] = SpectrogramView(train)
            elif kind in ("image", "video"):
                views[m] = FrameClip(train, 1 if kind == "image" else (p.frames or pipe.frames), size)
            else:
                views[m] = ArrayView()
        return views
