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
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from bench.errors import ConfigError, DataError, allowed_list
from bench.registry import DATASETS
from datasets import audio as fe
from datasets.base import ModalityKind
from datasets.cache import ArraySpec, CacheMeta, read_meta
from datasets.media import decode_video_frames, read_audio, read_image, resize_image
from datasets.prepared import CachedParams, Pipeline, Plan, PreparedDataset, SampleSource, View
from datasets.splits import ValCarving, carve_val, load_manifest
from datasets.transforms import FrameClip, SpectrogramView

CSV_NAME = "manifest.csv"  # what `--raw DIR` looks for
REQUIRED = ("id", "label")
SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "val", "test")
KIND_OF_SUFFIX: dict[str, ModalityKind] = {
    ".wav": "audio", ".flac": "audio", ".ogg": "audio",
    ".jpg": "image", ".jpeg": "image", ".png": "image",
    ".mp4": "video", ".avi": "video", ".mkv": "video", ".webm": "video", ".flv": "video",
    ".npy": "vector",
}
MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a cache file name and a config key
RESERVED = ("done", "meta", "report")  # cache files of their own
INTEGER = re.compile(r"^[+-]?\d+$")
NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
FLOAT16_MAX = float(np.finfo(np.float16).max)
SHOWN_MISTAKES = 20
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


# ---- reading the CSV ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One valid data row of the CSV."""

    line: int
    id: str
    label: str
    split: str | None
    files: dict[str, Path]


@dataclass
class ManifestTable:
    """A checked manifest CSV: its modality columns and kinds, rows, classes and npy shapes."""

    path: Path
    kinds: dict[str, ModalityKind]  # column -> kind, in column order
    rows: list[Row]
    classes: list[str]
    label_index: dict[str, int]  # label as written -> class index
    has_split: bool
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # vector column -> shape


class Mistakes:
    """The mistakes found in a CSV, each naming its line and column; raised together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, column: str | None, text: str) -> None:
        where = f"line {line}" + (f", column {column!r}" if column is not None else "")
        self.items.append((line, f"{where}: {text}"))

    def raise_if_any(self) -> None:
        """One DataError listing the first SHOWN_MISTAKES mistakes in line order."""
        if not self.items:
            return
        shown = [text for _, text in sorted(self.items, key=lambda item: item[0])[:SHOWN_MISTAKES]]
        more = len(self.items) - len(shown)
        tail = [f"... and {more} more"] if more else []
        raise DataError(
            f"manifest CSV {str(self.path)!r} has {len(self.items)} mistake(s):\n  "
            + "\n  ".join(shown + tail)
        )


def csv_path(raw: Path) -> Path:
    """The CSV that `--raw` names: the file itself, or DIR/manifest.csv."""
    path = raw / CSV_NAME if raw.is_dir() else raw
    if not path.is_file():
        raise DataError(f"manifest: {str(path)!r} does not exist; "
                        f"--raw must be a CSV file or a folder holding {CSV_NAME}")
    return path


def read_table(raw: Path) -> ManifestTable:
    """Read and check the manifest CSV; every mistake in it is raised together in one DataError."""
    path = csv_path(raw)
    header, records = _records(path)
    mistakes = Mistakes(path)
    columns = _check_header(header, mistakes)
    mistakes.raise_if_any()  # without a usable header no row can be read
    modalities = [c for c in columns if c not in (*REQUIRED, SPLIT_COLUMN)]
    rows = _check_rows(path.parent, columns, modalities, records, mistakes)
    kinds = _column_kinds(columns, modalities, records, mistakes)
    classes, label_index = _classes(rows)
    has_split = SPLIT_COLUMN in columns
    if has_split:
        _check_split_presence(columns, records, mistakes)
    shapes = {}
    for m, kind in kinds.items():
        shape = _npy_column_shape(rows, m, mistakes) if kind == "vector" else None
        if shape is not None:
            shapes[m] = shape
    mistakes.raise_if_any()
    if not rows:
        raise DataError(f"manifest CSV {str(path)!r} has a header but no data rows")
    return ManifestTable(path, kinds, rows, classes, label_index, has_split, shapes)


def _records(path: Path) -> tuple[tuple[int, list[str]], list[tuple[int, list[str]]]]:
    """(header, data records), each with the 1-based line it starts on; blank lines are skipped."""
    records = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            line = 1
            for cells in reader:
                if any(c.strip() for c in cells):
                    records.append((line, [c.strip() for c in cells]))
                line = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"manifest CSV {str(path)!r} cannot be read as UTF-8 CSV: {e}") from e
    if not records:
        raise DataError(f"manifest CSV {str(path)!r} is empty; its first line must be the header "
                        f"(id,label[,split],<modality>,...)")
    return records[0], records[1:]


def _check_header(header: tuple[int, list[str]], mistakes: Mistakes) -> list[str]:
    line, columns = header
    found = ", ".join(repr(c) for c in columns)
    for name in REQUIRED:
        if name not in columns:
            mistakes.add(line, name, f"missing required column {name!r}; columns found: {found} "
                                     f"(the header must name id, label, optionally split, and one column per modality)")
    seen: set[str] = set()
    for position, name in enumerate(columns, 1):
        if not name:
            mistakes.add(line, f"#{position}", "empty column name")
        elif name in seen:
            mistakes.add(line, name, "column name appears twice")
        elif name not in (*REQUIRED, SPLIT_COLUMN) and (not MODALITY_NAME.match(name) or name in RESERVED):
            mistakes.add(line, name, "not usable as a modality name: use letters, digits and _ , starting "
                                     f"with a letter, and none of {', '.join(RESERVED)}")
        seen.add(name)
    if not any(c not in (*REQUIRED, SPLIT_COLUMN) for c in columns if c):
        mistakes.add(line, None, f"no modality column (one column of file paths per modality); columns found: {found}")
    return columns


def _check_rows(base: Path, columns: list[str], modalities: list[str],
                records: list[tuple[int, list[str]]], mistakes: Mistakes) -> list[Row]:
    """The rows without mistakes; each mistake found is added to `mistakes`."""
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}  # id -> line it first appears on
    for line, cells in records:
        if len(cells) != len(columns):
            mistakes.add(line, None, f"{len(cells)} cells, but the header has {len(columns)} columns")
            continue
        cell = dict(zip(columns, cells))
        if _row_is_clean(line, cell, modalities, first_line_of, mistakes):
            files = {m: _resolve(base, cell[m]) for m in modalities}
            rows.append(Row(line, cell["id"], cell["label"], cell.get(SPLIT_COLUMN), files))
    return rows


def _row_is_clean(line: int, cell: dict[str, str], modalities: list[str], first_line_of: dict[str, int],
                  mistakes: Mistakes) -> bool:
    """Check one row's cells (empty, duplicate id, split, label, extensions); True if all are fine."""
    before = len(mistakes.items)
    for name, value in cell.items():
        if not value:
            mistakes.add(line, name, "empty cell")
    sid = cell["id"]
    if sid in first_line_of:
        mistakes.add(line, "id", f"duplicate id {sid!r} (also on line {first_line_of[sid]})")
    elif sid:
        first_line_of[sid] = line
    split = cell.get(SPLIT_COLUMN)
    if split and split not in SPLIT_VALUES:
        mistakes.add(line, SPLIT_COLUMN, f"unknown split {split!r}; allowed: {', '.join(SPLIT_VALUES)}")
    label = cell["label"]
    if NUMBER.match(label) and not INTEGER.match(label):
        mistakes.add(line, "label", f"label {label!r} is a number but not an integer; labels are class "
                                    "names or integers (write integer labels without a decimal point)")
    for m in modalities:
        suffix = Path(cell[m]).suffix.lower()
        if cell[m] and suffix not in KIND_OF_SUFFIX:
            what = f"extension {suffix!r}" if suffix else "no extension"
            mistakes.add(line, m, f"{cell[m]!r} has {what}; allowed: {' '.join(sorted(KIND_OF_SUFFIX))}")
    return len(mistakes.items) == before


def _resolve(base: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else base / path


def _column_kinds(columns: list[str], modalities: list[str], records: list[tuple[int, list[str]]],
                  mistakes: Mistakes) -> dict[str, ModalityKind]:
    """Each column's kind, set by its first known file; files of another kind are mistakes (on
    every row with a known extension there, rows with other mistakes included)."""
    kinds: dict[str, ModalityKind] = {}
    for m in modalities:
        at = columns.index(m)
        first: tuple[int, ModalityKind] | None = None
        for line, cells in records:
            kind = KIND_OF_SUFFIX.get(Path(cells[at]).suffix.lower()) if len(cells) == len(columns) else None
            if kind is None:
                continue
            if first is None:
                first = (line, kind)
            elif kind != first[1]:
                mistakes.add(line, m, f"{Path(cells[at]).name!r} is {_a(kind)} file, but this column's first "
                                      f"file (line {first[0]}) is {_a(first[1])}; a column holds one kind of file")
        if first is not None:
            kinds[m] = first[1]
    return kinds


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _classes(rows: list[Row]) -> tuple[list[str], dict[str, int]]:
    """Sorted unique labels (as numbers when all are integers) and each written label's index."""
    labels = {r.label for r in rows}
    if labels and all(INTEGER.match(lab) for lab in labels):
        values = sorted({int(lab) for lab in labels})
        classes = [str(v) for v in values]
        return classes, {lab: values.index(int(lab)) for lab in labels}
    classes = sorted(labels)
    return classes, {lab: classes.index(lab) for lab in labels}


def _check_split_presence(columns: list[str], records: list[tuple[int, list[str]]], mistakes: Mistakes) -> None:
    """A split column must hold train and test rows (counting rows with other mistakes too)."""
    at = columns.index(SPLIT_COLUMN)
    present = {cells[at] for _, cells in records if len(cells) == len(columns) and cells[at] in SPLIT_VALUES}
    for needed in ("train", "test"):
        if records and needed not in present:
            mistakes.add(records[0][0], SPLIT_COLUMN,
                         f"no row has split {needed!r} (found: {allowed_list(present)}); a split column needs "
                         "train and test rows (val is carved from train when absent), or leave the column out")


def _npy_column_shape(rows: list[Row], column: str, mistakes: Mistakes) -> tuple[int, ...] | None:
    """The one shape of a column's npy files (read from their headers), or None if none can be read.

    Files that are missing or unreadable are left to the prepare's missing/corrupt report.
    """
    first: tuple[int, tuple[int, ...]] | None = None
    for row in rows:
        shape = npy_shape(row.files[column])
        if shape is None:
            continue
        if first is None:
            first = (row.line, shape)
        elif shape != first[1]:
            mistakes.add(row.line, column, f"{row.files[column].name!r} holds an array of shape {shape}, but line "
                                           f"{first[0]}'s has shape {first[1]}; every npy of a column has one shape")
            return None
    if first is None:
        where = rows[0].files[column] if rows else "?"
        mistakes.add(rows[0].line if rows else 1, column,
                     f"none of the column's npy files can be read (first: {str(where)!r}), "
                     "so its array shape is unknown")
        return None
    return first[1]


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """The array shape in an .npy file's header, or None if the file is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except (OSError, ValueError):
        return None
    return tuple(int(n) for n in shape)


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
        frames = decode_video_frames(path, fps=1.0)
        if len(frames) > pipeline.frame_slots:  # longer clips keep frame_slots evenly spaced frames
            frames = [frames[i] for i in np.linspace(0, len(frames) - 1, pipeline.frame_slots).round().astype(int)]
        return np.stack([resize_image(f, side) for f in frames])
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
