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

Pipelines: the presets `default` (audio: 16 kHz, Kaldi fbank 128 mel bins x 1024 frames of 10 ms,
as MLA's; images: 224x224; videos: 1-fps frames, up to 10 kept, evenly spaced, 3 used per clip
in training: random within 3 segments, segment centres at test) and `small` (fbank 64 x 128,
images and videos at 64x64, for quick CPU runs), each adjustable option by option: sample rate,
clip length and crop/pad policy, feature (fbank, log-mel, STFT), bins and frames, image size,
video frames, training augmentations (random resized crop; horizontal flip, off by default) and
normalisation (audio and npy columns z-scored with the train split's statistics, on by default).
datasets/manifest_pipeline.py documents every option. npy arrays are stored float16 as they are
and read as float32 of the stored shape. Frames are resized to squares (aspect ratio not kept),
as the reference repos' loaders do.

datasets/manifest_csv.py reads and checks the CSV; this module turns the checked table into
splits, cached arrays and training views.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from mmbalance.core.errors import ConfigError, DataError, DataWarning
from mmbalance.core.registry import DATASETS
from mmbalance.core.types import ModalityKind
from mmbalance.datasets.batch_views import standardise_
from mmbalance.datasets.cache import ArraySpec, Cache, CacheMeta, read_meta
from mmbalance.datasets.manifest_csv import FLOAT16_MAX, SPLIT_VALUES, ManifestTable, lines_of, odd_labels, read_table
from mmbalance.datasets.manifest_pipeline import (  # noqa: F401 (PIPELINES: this dataset's presets)
    PIPELINES,
    ManifestPipeline,
    PipelineOptions,
    audio_features,
    configure,
    recorded_pipeline,
    settle,
)
from mmbalance.datasets.media import clip_frames, read_audio, read_image, resize_image
from mmbalance.datasets.prepared import CachedParams, Plan, PreparedDataset, SampleSource, View
from mmbalance.datasets.splits import ValCarving, carve_val, load_manifest
from mmbalance.datasets.transforms import FrameClip, SpectrogramView

TEST_FRACTION = 0.2  # without a split column: 70/10/20
VAL_FRACTION = 0.1
CARVING_SEED = 0


class ManifestParams(CachedParams):
    # the preset the cache must have been prepared from (a check); default: the cache's
    pipeline: Literal["default", "small"] | None = None
    # pipeline options (datasets/manifest_pipeline.py), read from the cache: a config may leave
    # them out; those it gives must equal the cache's, except RUN_OPTIONS, which it may change
    options: dict[str, Any] = Field(default_factory=dict)
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


def array_spec(kind: ModalityKind, options: PipelineOptions, shape: tuple[int, ...] = ()) -> ArraySpec:
    """What the cache stores per row for a column of this kind."""
    side = options.image.size
    if kind == "audio":  # random-at-train keeps each clip's real frame count beside its frames
        audio = options.audio
        return ArraySpec((audio.stored_frames, audio.bins), "float16", frames=audio.crop == "random-at-train")
    if kind == "image":
        return ArraySpec((1, side, side, 3), "uint8", frames=True)
    if kind == "video":
        return ArraySpec((options.video.slots, side, side, 3), "uint8", frames=True)
    return ArraySpec(shape or (1,), "float16")  # a 0-d array is stored as one value


def decode(path: Path, kind: ModalityKind, options: PipelineOptions) -> np.ndarray:
    """One file -> the array its column stores."""
    if kind == "audio":
        return audio_features(*read_audio(path), options.audio)
    side = (options.image.size, options.image.size)
    if kind == "image":
        return resize_image(read_image(path), side)[None]
    if kind == "video":
        return clip_frames(path, options.video.slots, options.image.size, "spaced")
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
    """A stored float16 array -> float32 tensor of the same shape (npy columns), optionally
    normalised: norm=(mean, std) maps x to (x - mean) / std."""

    norm: tuple[float, float] | None = None

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return tuple(stored)

    def __call__(self, arr: np.ndarray, count: int | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: rows are read-only maps
        return standardise_(x, *self.norm) if self.norm else x


# ---- the dataset --------------------------------------------------------------------------------


@DATASETS.register("manifest")
class Manifest(PreparedDataset):
    """Your own data from a CSV (id, label, [split], one file-path column per modality)."""

    Params = ManifestParams
    PIPELINES: ClassVar = PIPELINES
    DEFAULT_PIPELINE: ClassVar = "default"
    STATS_KINDS: ClassVar = ("audio", "vector")
    ENCODER_OF_KIND: ClassVar[dict[str, dict[str, Any]]] = {
        "audio": {"name": "resnet18"}, "image": {"name": "resnet18"},
        "video": {"name": "resnet18"}, "vector": {"name": "mlp"},
    }

    # ---- config validation: modalities come from the prepared cache -----------------------------

    @classmethod
    def cache_root(cls, params: BaseModel) -> Path:
        given = getattr(params, "root", None)
        return Path(given).expanduser() if given else cls.default_root(getattr(params, "pipeline", None))

    @classmethod
    def cache_meta(cls, params: BaseModel) -> CacheMeta:
        """meta.json of the cache at `params.root` (or the default root), for config validation."""
        root = cls.cache_root(params)
        key = "dataset.root" if getattr(params, "root", None) else "dataset.root, unset, so the default"
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
    def resolve_params(cls, params: BaseModel, origin_of: Callable[[str], str]) -> BaseModel:
        """The params with the cache's preset and every pipeline option filled in (so that
        show-config shows them and the run id depends on them), checked against the cache."""
        meta = cls.cache_meta(params)
        options = cls.settled_options(meta, cls.cache_root(params), params, origin_of)
        return params.model_copy(update={"pipeline": meta.pipeline, "options": options.model_dump(mode="json")})

    @classmethod
    def settled_options(cls, meta: CacheMeta, root: Path, params: BaseModel,
                        origin_of: Callable[[str], str] = lambda key: "the dataset params") -> PipelineOptions:
        """The pipeline options a run on this cache uses; refuses a preset or an option that
        differs from the cache's."""
        if params.pipeline is not None and params.pipeline != meta.pipeline:
            raise ConfigError(f"dataset.pipeline={params.pipeline!r} (from {origin_of('dataset.pipeline')}) differs "
                              f"from the preset cache {str(root)!r} was prepared from, {meta.pipeline!r}; leave it "
                              f"out to use the cache's")
        return settle(recorded_pipeline(meta.pipeline_params, root).options, params.options, root, origin_of)

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
    def configure(cls, name: str, pipeline_file: str | Path | None = None,
                  options: Sequence[str] = ()) -> ManifestPipeline:
        cls.pipeline(name)  # an unknown preset is refused with the allowed names
        return configure(name, pipeline_file, options)

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
        arrays = {m: array_spec(k, pipeline.options, table.shapes.get(m, ())) for m, k in table.kinds.items()}
        notes.append(f"{str(table.path)!r}: {len(table.rows)} rows, {len(table.classes)} classes, modalities "
                     + ", ".join(f"{m} ({k})" for m, k in table.kinds.items()))
        return Plan(table.classes, samples, splits, pipeline.flavour, notes, arrays=arrays, kinds=dict(table.kinds))

    @classmethod
    def array_specs(cls, pipeline: ManifestPipeline) -> dict[str, ArraySpec]:
        raise DataError("manifest: the cached arrays depend on the CSV's columns; they come from plan()")

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: ManifestPipeline) -> dict[str, np.ndarray]:
        kinds = source.extra["kinds"]
        return {m: decode(path, kinds[m], pipeline.options) for m, path in source.files.items()}

    # ---- training -----------------------------------------------------------------------------

    def check_cache(self, cache: Cache) -> None:
        if cache.meta.dataset != self.registry_name:
            raise DataError(f"cache {str(cache.root)!r} (dataset.root) holds a cache of dataset "
                            f"{cache.meta.dataset!r}, not 'manifest'")
        self.settled_options(cache.meta, cache.root, self.params)

    @cached_property
    def options(self) -> PipelineOptions:
        """The pipeline options this run uses: the cache's, with the run's RUN_OPTIONS."""
        return self.settled_options(self.cache.meta, self.cache.root, self.params)

    def views(self, train: bool) -> dict[str, View]:
        o, kinds = self.options, self.cache.meta.kinds
        window = o.audio.window_frames if o.audio.crop == "random-at-train" else None
        size = self.params.frame_size or o.image.size
        crop = "random_resized" if "crop" in o.augment else "none"
        views: dict[str, View] = {}
        for m in self.params.modalities or kinds:
            kind = kinds[m]
            if kind == "audio":
                views[m] = SpectrogramView(train, crop=window, time_axis=0, norm=self._norm(m))
            elif kind in ("image", "video"):
                frames = 1 if kind == "image" else o.video.frames
                views[m] = FrameClip(train, frames, size, crop=crop, flip="flip" in o.augment)
            else:
                views[m] = ArrayView(self._norm(m))
        return views

    def _norm(self, modality: str) -> tuple[float, float] | None:
        """(mean, std) of the modality's train split, when the options normalise."""
        if not self.options.normalize:
            return None
        stats = self.cache.meta.stats.get(modality)
        if stats is None:
            raise DataError(f"cache {str(self.cache.root)!r} holds no train statistics for {modality!r} "
                            "(its train split has no prepared row); set dataset.options.normalize=false")
        return stats["mean"], stats["std"]
