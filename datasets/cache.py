"""The prepared-dataset cache: one directory of memory-mappable arrays plus its metadata.

Layout of a cache directory::

    meta.json               what is in it (dataset, pipeline, classes, ids, labels, splits, skipped)
    <modality>.npy          (N, *shape) float16 spectrograms or uint8 frames, opened with mmap
    <modality>.count.npy    (N,) int16: for frame modalities, how many of the T slots are real
    <modality>.source.npy   (N, 2) int32: for resized frame modalities, each row's frames' (height,
                            width) before the prepare resized them (the crops are drawn on that size)
    done.npy                (N,) bool: rows fully written (an interrupted prepare resumes from it)
    report.json             the last prepare's report (missing and corrupt files by path)

Rows follow the order of `meta.ids`; a split is a list of row indices. Rows that could not be
prepared stay in the arrays but are left out of every split and listed in `meta.skipped`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from mmbalance.core.errors import DataError

# 2: frames kept at their aspect with the size they were resized from (<modality>.source.npy)
FORMAT_VERSION = 2
FLUSH_EVERY = 64


@dataclass(frozen=True)
class ArraySpec:
    """The per-sample array of one modality in the cache.

    `frames` marks a (T, H, W, C) stack padded to T slots; its real length is stored beside it.
    `resized` marks frames resized at prepare time from frames of another size, which is stored
    beside them per row (each sample then comes as SizedFrames).
    """

    shape: tuple[int, ...]
    dtype: Literal["float16", "float32", "uint8", "int32"]  # int32: token ids
    frames: bool = False
    resized: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "frames": self.frames, "resized": self.resized}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArraySpec:
        return cls(tuple(d["shape"]), d["dtype"], bool(d.get("frames", False)), bool(d.get("resized", False)))


@dataclass(frozen=True)
class SizedFrames:
    """A sample's frames as the cache stores them, and the (height, width) they were resized from."""

    frames: np.ndarray
    source: tuple[int, int]


class CacheMeta(BaseModel):
    """meta.json: everything a loader needs besides the arrays."""

    format: int = FORMAT_VERSION
    dataset: str
    pipeline: str
    pipeline_params: dict[str, Any]
    classes: list[str]
    arrays: dict[str, dict[str, Any]]  # modality -> ArraySpec.to_dict()
    kinds: dict[str, str] = Field(default_factory=dict)  # modality -> audio / image / video / vector
    ids: list[str]
    labels: list[int]
    # split -> row indices; rows that were skipped are not in any split
    splits: dict[str, list[int]]
    split_info: dict[str, Any] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)  # id -> why (names the file)
    # modality -> {mean, std, values}: over the train split's prepared rows (STATS_KINDS only)
    stats: dict[str, dict[str, float]] = Field(default_factory=dict)
    complete: bool = False

    def array_specs(self) -> dict[str, ArraySpec]:
        return {m: ArraySpec.from_dict(d) for m, d in self.arrays.items()}

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed prepare to continue an existing cache."""
        keys = ("format", "dataset", "pipeline", "pipeline_params", "arrays", "ids", "labels")
        return {k: getattr(self, k) for k in keys}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(root: Path) -> CacheMeta:
    path = root / "meta.json"
    if not path.is_file():
        raise DataError(
            f"{str(root)!r} is not a prepared cache (no meta.json); "
            f"make one with `mmbalance prepare NAME --raw DIR --out {root}`"
        )
    try:
        meta = CacheMeta.model_validate_json(path.read_text())
    except ValueError as e:
        raise DataError(f"cache metadata {str(path)!r} is unreadable: {e}") from e
    if meta.format != FORMAT_VERSION:
        raise DataError(
            f"cache {str(root)!r} has format {meta.format}, and this version of mmbalance reads format "
            f"{FORMAT_VERSION} (frames are stored at their own aspect since format 2); delete it and prepare it "
            f"again: `mmbalance prepare {meta.dataset} --pipeline {meta.pipeline} --raw DIR --out {root}`"
        )
    return meta


class CacheWriter:
    """Creates a cache directory, or reopens an unfinished one with the same identity."""

    def __init__(self, root: Path, meta: CacheMeta) -> None:
        self.root = root
        self.meta = meta
        self.specs = meta.array_specs()
        root.mkdir(parents=True, exist_ok=True)
        n = len(meta.ids)
        if (root / "meta.json").exists():
            self._check_same(read_meta(root))
            self.done = np.load(root / "done.npy")
            self.arrays = {m: np.load(root / f"{m}.npy", mmap_mode="r+") for m in self.specs}
            self.counts = {m: np.load(root / f"{m}.count.npy") for m, s in self.specs.items() if s.frames}
            self.sources = {m: np.load(root / f"{m}.source.npy") for m, s in self.specs.items() if s.resized}
        else:
            self.done = np.zeros(n, dtype=bool)
            self.arrays = {
                m: np.lib.format.open_memmap(root / f"{m}.npy", "w+", np.dtype(s.dtype), (n, *s.shape))
                for m, s in self.specs.items()
            }
            self.counts = {m: np.zeros(n, dtype=np.int16) for m, s in self.specs.items() if s.frames}
            self.sources = {m: np.zeros((n, 2), dtype=np.int32) for m, s in self.specs.items() if s.resized}
            self.flush()
        self._since_flush = 0

    def _check_same(self, existing: CacheMeta) -> None:
        if existing.identity() != self.meta.identity():
            differing = [k for k, v in self.meta.identity().items() if existing.identity()[k] != v]
            raise DataError(
                f"{str(self.root)!r} already holds a different cache ({', '.join(differing)} differ: "
                f"it has dataset {existing.dataset!r}, pipeline {existing.pipeline!r}); "
                f"choose another --out or delete that directory"
            )

    def pending(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]

    def write(self, row: int, sample: dict[str, np.ndarray | SizedFrames]) -> None:
        """Store one sample's arrays; raises DataError if they do not fit the declared specs, and
        OSError (naming the file) if the disk has no room for the row."""
        arrays = {}
        for m, spec in self.specs.items():
            if m not in sample:
                raise DataError(f"sample {self.meta.ids[row]!r}: modality {m!r} was not produced")
            arrays[m] = self._array_of(row, m, spec, sample[m])
        for m in self.specs:
            reserve_row(self.arrays[m], row, f"row {row} of the {m} array")
        for m, spec in self.specs.items():
            arr = arrays[m]
            if spec.frames:
                t = min(len(arr), spec.shape[0])
                if arr.shape[1:] != spec.shape[1:] or t == 0:
                    raise DataError(f"sample {self.meta.ids[row]!r}: {m} frames of shape {arr.shape}, "
                                    f"expected (T<= {spec.shape[0]}, {spec.shape[1:]})")
                self.arrays[m][row, :t] = arr[:t]
                self.arrays[m][row, t:] = 0
                self.counts[m][row] = t
            else:
                if arr.shape != spec.shape:
                    raise DataError(f"sample {self.meta.ids[row]!r}: {m} has shape {arr.shape}, expected {spec.shape}")
                self.arrays[m][row] = arr
        self.done[row] = True
        self._since_flush += 1
        if self._since_flush >= FLUSH_EVERY:
            self.flush()

    def _array_of(self, row: int, m: str, spec: ArraySpec, value: np.ndarray | SizedFrames) -> np.ndarray:
        """The array of a modality's value; for resized frames, their source size is noted first."""
        if not spec.resized:
            return np.asarray(value)
        if not isinstance(value, SizedFrames) or min(value.source) < 1:
            raise DataError(f"sample {self.meta.ids[row]!r}: {m} frames come without the size they were resized "
                            f"from (SizedFrames with a positive (height, width))")
        self.sources[m][row] = value.source
        return np.asarray(value.frames)

    def flush(self) -> None:
        """Make everything written so far durable; `done` is saved last so it never runs ahead."""
        for arr in self.arrays.values():
            arr.flush()
        for m, counts in self.counts.items():
            _save_atomic(self.root / f"{m}.count.npy", counts)
        for m, sources in self.sources.items():
            _save_atomic(self.root / f"{m}.source.npy", sources)
        _save_atomic(self.root / "done.npy", self.done)
        write_json_atomic(self.root / "meta.json", self.meta.model_dump())
        self._since_flush = 0

    def finish(self, skipped: dict[str, str], split_info: dict[str, Any], stats_of: Sequence[str] = ()) -> CacheMeta:
        """Drop skipped rows from the splits, store the train split's statistics of the
        modalities `stats_of`, and mark the cache complete."""
        keep = self.done
        self.meta.splits = {s: [i for i in rows if keep[i]] for s, rows in self.meta.splits.items()}
        self.meta.skipped = skipped
        self.meta.split_info = split_info
        train = self.meta.splits.get("train", [])
        self.meta.stats = {m: split_stats(self.arrays[m], train, self.counts.get(m)) for m in stats_of if train}
        self.meta.complete = True
        self.flush()
        return self.meta


def split_stats(array: np.ndarray, rows: Sequence[int], counts: np.ndarray | None = None,
                chunk: int = 256) -> dict[str, float]:
    """{mean, std (population), values} of `array[rows]` in float64, read in chunks of rows in
    the order given (the same numbers whatever order the prepare wrote them in). With `counts`
    (frame-stacked modalities), only each row's first counts[row] entries along its first axis."""
    def blocks() -> Iterator[np.ndarray]:
        for i in range(0, len(rows), chunk):
            part = np.asarray(rows[i : i + chunk])
            block = np.asarray(array[part], dtype=np.float64)
            if counts is not None:
                block = block[np.arange(block.shape[1])[None, :] < counts[part][:, None]]
            yield block

    n = sum(b.size for b in blocks())
    mean = sum(float(b.sum()) for b in blocks()) / n
    var = sum(float(np.square(b - mean).sum()) for b in blocks()) / n  # two passes: no cancellation
    return {"mean": mean, "std": var ** 0.5, "values": n}


def reserve_row(array: np.memmap, row: int, what: str) -> None:
    """Give row `row` of the memory-mapped `array` its disk blocks before it is written. A new
    array is a sparse file: without this, a disk that fills up mid-prepare kills the process with
    SIGBUS at the write (no message, nothing to catch) instead of an OSError here. Row by row, not
    the whole array at once: rows of listed samples whose files are missing are never written and
    take no space."""
    length = int(np.prod(array.shape[1:], dtype=np.int64)) * array.itemsize
    fd = os.open(array.filename, os.O_RDWR)
    try:
        os.posix_fallocate(fd, array.offset + row * length, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: written as before
            return
        free = shutil.disk_usage(os.path.dirname(array.filename)).free
        raise OSError(e.errno, f"{e.strerror or os.strerror(e.errno)} ({what} needs {_size(length)}, "
                               f"{_size(free)} is free)", str(array.filename)) from e
    finally:
        os.close(fd)


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


class Cache:
    """A complete cache opened for reading; arrays are memory-mapped on first use in each process."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if not self.meta.complete:
            raise DataError(
                f"cache {str(self.root)!r} is unfinished (its prepare was interrupted or stopped on an error); "
                f"run the same `mmbalance prepare` again to finish it"
            )
        self.specs = self.meta.array_specs()
        self.counts = {m: np.load(self.root / f"{m}.count.npy") for m, s in self.specs.items() if s.frames}
        self.sources = {m: np.load(self.root / f"{m}.source.npy") for m, s in self.specs.items() if s.resized}
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            # plain ndarrays over the maps: every row taken from an np.memmap pays its subclass
            # bookkeeping (memmap.__getitem__, __array_finalize__), several microseconds a sample
            self._arrays = {m: np.load(self.root / f"{m}.npy", mmap_mode="r").view(np.ndarray) for m in self.specs}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps instead of receiving copies of the data
        return {**self.__dict__, "_arrays": None}
