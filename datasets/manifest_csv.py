"""Reading and checking a `manifest` CSV: every mistake reported by line and column, at once.

The format is described in datasets/manifest.py, which turns a checked table into a dataset.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmbalance.core.errors import DataError, allowed_list
from mmbalance.core.types import ModalityKind

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


def odd_labels(rows: list[Row]) -> list[str]:
    """Warnings for labels of the minority kind when integers and words are mixed ('seven' among
    '0'..'9' is most likely a typo, and it would silently become a class of its own)."""
    numeric = [r for r in rows if INTEGER.match(r.label)]
    words = [r for r in rows if not INTEGER.match(r.label)]
    if not numeric or not words:
        return []
    odd, kind, other = (words, "word", "integers") if len(words) <= len(numeric) else (numeric, "integer", "words")
    labels = sorted({r.label for r in odd})
    return [f"{len(odd)} row(s) have {kind} label(s) {', '.join(map(repr, labels))} while the other "
            f"{len(rows) - len(odd)} rows' labels are {other}: a typo? each becomes a class of its own "
            f"({lines_of(odd)})"]


def lines_of(rows: list[Row], shown: int = 10) -> str:
    """'lines 3, 8, 12' (the first `shown`, then how many more)."""
    lines = [str(r.line) for r in rows]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(lines[:shown])}{more}"


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
