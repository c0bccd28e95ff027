"""Feature sequences from the MulT-style pickles (CMU-MOSEI, IEMOCAP): reading, checking, caching.

The multimodal-sentiment papers (MulT, Tsai et al. ACL 2019, and the repos that reuse its data:
BalanceBenchmark, MISA, Self-MM) share one file format, `<name>_data.pkl` (word-aligned) or
`<name>_data_noalign.pkl`::

    {"train" | "valid" | "test": {
        "text":   (N, T_text, 300)   GloVe word vectors
        "audio":  (N, T_audio, 74)   COVAREP frames (holds -inf)
        "vision": (N, T_vision, 35)  Facet frames
        "labels": (N, 1, 1) sentiment in [-3, 3] (MOSEI), (N, 4, 2) one-hot per emotion (IEMOCAP)
        "id":     (N, k) ids (optional; BalanceBenchmark's loader reads it only if present)}}

Sequences are padded to the split's fixed length with all-zero frames (at the front in the
unaligned files, as MISA's `get_length` reads them). The cache keeps them exactly so, as float32
(the references cast to float32 at load), after the references' cleaning: audio `-inf` -> 0
(BalanceBenchmark's and MulT's loaders); NaN and the other infinities, which those loaders do not
expect, are zeroed the same way rather than poisoning training. Padding is left to the encoder
(models.sequence masks all-zero frames when asked; the references do not mask).

The whole pickle is read once, in `plan` (a pickle cannot be read in parts); each sample then
travels to the decoding step as views of its rows (SampleSource.extra), so the suite's prepare
machinery (workers, resume, report, split check) applies unchanged. The per-sample work is a
cast, so worker processes only add the cost of sending rows to them: `--workers 1` is the
fastest (on the fixtures 3-4x faster than 2 workers), and reading MOSEI's unaligned pickle takes
its 12 GB of memory, as in every reference loader.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmbalance.core.errors import DataError
from mmbalance.core.types import ModalityKind
from mmbalance.datasets.cache import ArraySpec
from mmbalance.datasets.prepared import Pipeline, Plan, PreparedDataset, SampleSource, View
from mmbalance.datasets.transforms import BatchedView, Empty

# our modality name -> the pickle's key
FEATURE_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}
# our split name -> the pickle's key
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}


class MultPipeline(Pipeline):
    aligned: bool = False  # <name>_data.pkl (word-aligned) rather than <name>_data_noalign.pkl


@dataclass(frozen=True)
class PickleRow:
    """One sample of the pickle: its id, the split key it is under, its row there, its raw label."""

    id: str
    split: str  # train / val / test (the pickle's train / valid / test)
    index: int
    label: np.ndarray


@dataclass
class MultPickle:
    path: Path
    features: dict[str, dict[str, np.ndarray]]  # split -> modality -> (N, T, D)
    rows: list[PickleRow]
    notes: list[str]

    def shapes(self, dataset: str) -> dict[str, tuple[int, int]]:
        """modality -> (T, D), the same in every split (the cache's rows are of one shape)."""
        shapes: dict[str, tuple[int, int]] = {}
        for split, arrays in self.features.items():
            for m, arr in arrays.items():
                shape = tuple(int(s) for s in arr.shape[1:])
                if shapes.setdefault(m, shape) != shape:
                    raise DataError(f"{dataset}: {str(self.path)!r} [{SPLIT_KEYS[split]!r}][{FEATURE_KEYS[m]!r}] has "
                                    f"frames of shape {shape}, other splits {shapes[m]}; one (T, D) per modality "
                                    f"is allowed")
        return shapes


def pickle_path(raw: Path, dataset: str, stem: str, aligned: bool) -> Path:
    """The pickle the pipeline reads: RAW itself if it is a file, else RAW/<stem>_data[_noalign].pkl."""
    if raw.is_file():
        return raw
    name = f"{stem}_data.pkl" if aligned else f"{stem}_data_noalign.pkl"
    path = raw / name
    if not path.is_file():
        others = sorted(p.name for p in raw.glob("*.pkl")) if raw.is_dir() else []
        raise DataError(f"{dataset}: {str(path)!r} does not exist; --raw must be the folder holding {name} (the "
                        f"{'aligned' if aligned else 'unaligned'} MulT pickle) or that file"
                        + (f"; found {', '.join(others)}" if others else ""))
    return path


def read_pickle(path: Path, dataset: str) -> MultPickle:
    """The pickle at `path`, checked: every split key, every feature key, (N, T, D) arrays, labels."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise DataError(f"{dataset}: {str(path)!r} is not a readable pickle: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{dataset}: {str(path)!r} holds a {type(data).__name__}, not the MulT dict with keys "
                        f"{', '.join(SPLIT_KEYS.values())}")
    features: dict[str, dict[str, np.ndarray]] = {}
    rows: list[PickleRow] = []
    for split, key in SPLIT_KEYS.items():
        part = _entry(data, key, f"{str(path)!r}", dataset, "split key")
        where = f"{str(path)!r} [{key!r}]"
        features[split] = {m: _array(part, k, where, dataset, ndim=3) for m, k in FEATURE_KEYS.items()}
        labels = _array(part, "labels", where, dataset)
        n = len(labels)
        for m, arr in features[split].items():
            if len(arr) != n:
                raise DataError(f"{dataset}: {where}[{FEATURE_KEYS[m]!r}] has {len(arr)} rows, 'labels' {n}")
        ids = sample_ids(part.get("id"), n, key, where, dataset)
        rows += [PickleRow(ids[i], split, i, labels[i]) for i in range(n)]
    notes = []
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.id] = seen.get(r.id, 0) + 1
    repeated = [i for i, c in seen.items() if c > 1]
    if repeated:  # ids must be unique in a cache: the repeated ones get their split and row appended
        notes.append(f"{len(repeated)} ids occur more than once in the pickle (first {repeated[0]!r}); those samples "
                     f"are named <id>#<split><row>")
        rows = [PickleRow(f"{r.id}#{r.split}{r.index}", r.split, r.index, r.label) if seen[r.id] > 1 else r
                for r in rows]
    return MultPickle(path, features, rows, notes)


def _entry(data: dict, key: str, where: str, dataset: str, what: str) -> Any:
    if key not in data:
        raise DataError(f"{dataset}: {where} has no {what} {key!r} (it has {', '.join(map(repr, data))}); the MulT "
                        f"pickle has train, valid and test, each with text, audio, vision and labels")
    return data[key]


def _array(part: Any, key: str, where: str, dataset: str, ndim: int | None = None) -> np.ndarray:
    if not isinstance(part, dict):
        raise DataError(f"{dataset}: {where} is a {type(part).__name__}, not a dict of arrays")
    arr = _entry(part, key, where, dataset, "key")
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) or (ndim and arr.ndim != ndim):
        shape = getattr(arr, "shape", None)
        raise DataError(f"{dataset}: {where}[{key!r}] is {type(arr).__name__} of shape {shape}; expected a numeric "
                        f"array" + (" (N, T, D)" if ndim == 3 else ""))
    return arr


def sample_ids(ids: Any, n: int, key: str, where: str, dataset: str) -> list[str]:
    """Each row's id: its `id` entries joined by '_' (bytes decoded), or `<split>_<row>` without ids."""
    if ids is None:
        return [f"{key}_{i:05d}" for i in range(n)]
    ids = np.asarray(ids, dtype=object)
    if len(ids) != n:
        raise DataError(f"{dataset}: {where}['id'] has {len(ids)} rows, 'labels' {n}")
    return ["_".join(_text(p) for p in np.ravel(row)) for row in ids]


def _text(part: Any) -> str:
    return part.decode("utf-8", "replace") if isinstance(part, bytes) else str(part)


def clean(frames: np.ndarray) -> np.ndarray:
    """float32 frames with -inf (audio, as the references do), NaN and +inf set to 0."""
    x = np.asarray(frames, dtype=np.float32)
    return np.where(np.isfinite(x), x, np.float32(0.0))


def build_plan(dataset: str, pkl: MultPickle, labels: dict[str, int], splits: dict[str, list[str]],
               classes: Sequence[str], flavour: str, kinds: dict[str, ModalityKind], notes: Sequence[str] = ()) -> Plan:
    """The prepare plan: every sample of `splits` (ids of `pkl.rows`, labelled by `labels`), with
    its feature rows handed over as views (no copy) for `load_sample`."""
    by_id = {r.id: r for r in pkl.rows}
    samples = []
    for split_ids in splits.values():
        for sid in split_ids:
            r = by_id[sid]
            rows = {m: pkl.features[r.split][m][r.index] for m in FEATURE_KEYS}
            samples.append(SampleSource(sid, labels[sid], {"pickle": pkl.path}, {"frames": rows}))
    arrays = {m: ArraySpec(shape, "float32") for m, shape in pkl.shapes(dataset).items()}
    return Plan(list(classes), samples, splits, flavour, [*pkl.notes, *notes], arrays=arrays, kinds=dict(kinds))


def pickle_splits(pkl: MultPickle, labels: dict[str, int]) -> dict[str, list[str]]:
    """The pickle's own train / valid / test, without the samples that have no label."""
    return {s: [r.id for r in pkl.rows if r.split == s and r.id in labels] for s in SPLIT_KEYS}


@dataclass(frozen=True)
class FeatureSequence(BatchedView):
    """A cached (T, D) float32 sequence -> the same (T, D) float32 tensor (no randomness)."""

    def shape(self, stored: Sequence[int]) -> tuple[int, ...]:
        return tuple(stored)

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> None:
        return None

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[None], empty: Empty = np.empty) -> torch.Tensor:
        out = empty((len(arrs), *arrs[0].shape), np.float32)
        for o, a in zip(out, arrs):
            o[...] = a
        return torch.from_numpy(out)


class MultFeatureDataset(PreparedDataset):
    """Base of the datasets read from a MulT pickle: audio, visual and text feature sequences, a
    small transformer per modality by default, and the cleaning every reference applies."""

    MODALITIES: ClassVar[tuple[str, ...]] = tuple(FEATURE_KEYS)
    KINDS: ClassVar[dict[str, ModalityKind]] = {"audio": "audio", "visual": "video", "text": "text"}
    DEFAULT_ENCODERS: ClassVar[dict[str, dict[str, Any]]] = {m: {"name": "seq", "kind": "transformer"}
                                                             for m in FEATURE_KEYS}
    STEM: ClassVar[str] = ""  # the pickle's name: <STEM>_data[_noalign].pkl

    @classmethod
    def read(cls, raw: Path, pipeline: MultPipeline) -> MultPickle:
        return read_pickle(pickle_path(raw, cls.registry_name, cls.STEM, pipeline.aligned), cls.registry_name)

    @classmethod
    def labelled(cls, pkl: MultPickle, label_of: Callable[[np.ndarray], int | None]) -> dict[str, int]:
        """id -> class of every row `label_of` gives a class (None: the setting leaves it out)."""
        out = {}
        for r in pkl.rows:
            y = label_of(r.label)
            if y is not None:
                out[r.id] = y
        return out

    @classmethod
    def array_specs(cls, pipeline: Pipeline) -> dict[str, ArraySpec]:
        # the sequence lengths are the pickle's: the plan gives the specs (Plan.arrays)
        raise DataError(f"{cls.registry_name}: the cached shapes come from the pickle (the plan)")

    @classmethod
    def load_sample(cls, source: SampleSource, pipeline: Pipeline) -> dict[str, np.ndarray]:
        return {m: clean(frames) for m, frames in source.extra["frames"].items()}

    def views(self, train: bool) -> dict[str, View]:
        return {m: FeatureSequence() for m in self.MODALITIES}
