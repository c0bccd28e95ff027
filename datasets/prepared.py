"""Datasets read from a prepared cache (the real datasets of the papers, and the `manifest` one).

A subclass supplies the two halves of its life:

* prepare (once, `mmbalance prepare NAME --raw DIR`): `PIPELINES` (named preprocessing
  variants; `configure()` turns a name and any pipeline options into the one a prepare runs,
  and only datasets that take options, like `manifest`, override it), `STATS_KINDS` (the kinds
  of modality whose train-split mean and std the prepare stores), `plan()` (read the raw
  download's split files into samples and splits),
  `array_specs()` (what each cached row holds) and `load_sample()` (decode and preprocess one
  sample; runs in worker processes, so it must be a pure function of its arguments);
* training: `views()` (cached row -> encoder input, per split), from its `Params`, and
  `check_cache()` (the cache at dataset.root is the one the params ask for).

`bench.train` only sees `split(name)`, a torch Dataset of `(inputs, label)` pairs.
"""

from __future__ import annotations

import sys
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.params import Strict
from mmbalance.core.types import Batch, Modality, ModalityKind
from mmbalance.datasets.base import Dataset
from mmbalance.datasets.batch_views import Drawn, draws_key
from mmbalance.datasets.cache import ArraySpec, Cache, SizedFrames
from mmbalance.datasets.transforms import BatchedView, Empty

# (row, frame count) -> tensor; the views of resized frames also take source=(height, width)
View = Callable[..., "torch.Tensor | Drawn"]


class Pipeline(BaseModel):
    """One named preprocessing variant; subclasses add their fields (sample rate, STFT sizes...)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str
    flavour: str  # the split flavour in the dataset's manifest


@dataclass(frozen=True)
class SampleSource:
    """One sample as found in the raw download: what to read, and its label."""

    id: str
    label: int
    files: dict[str, Path]  # role -> path; every one must exist (missing ones are reported by path)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. an event's start and end seconds


@dataclass
class Plan:
    """What a prepare will produce: classes, every sample, and the split lists (val carved)."""

    classes: list[str]
    samples: list[SampleSource]
    splits: dict[str, list[str]]
    flavour: str = ""
    notes: list[str] = field(default_factory=list)  # what the plan had to decide (dropped duplicates...)
    # datasets whose rows depend on the raw data (the `manifest` CSV) give them here instead of
    # through array_specs() and KINDS
    arrays: dict[str, ArraySpec] | None = None
    kinds: dict[str, ModalityKind] | None = None


class CachedParams(Strict):
    """What every cached dataset takes: where its cache is and which pipeline it must hold."""

    root: str | None = None  # default: data/<dataset>/<pipeline>, relative to the working directory
    pipeline: str | None = None  # default: the dataset's DEFAULT_PIPELINE


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """torch's CPU RNG seeded with `seed` inside the block and as it was after it (nothing done
    for None). The CPU generator only: torch.manual_seed also queues seeds for every accelerator
    backend, recording a stack trace each time, most of a cached sample's cost."""
    if seed is None:
        yield
        return
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


@dataclass(frozen=True)
class PerSample(BatchedView):
    """A view without separate draw and gather steps, as one: it runs whole per sample (under the
    sample's seed) and the batch stacks its outputs."""

    view: View

    def draw(self, arr: np.ndarray, count: int | None = None, source: tuple[int, int] | None = None) -> torch.Tensor:
        return self.view(arr, count) if source is None else self.view(arr, count, source=source)

    def gather(self, arrs: Sequence[np.ndarray], draws: Sequence[torch.Tensor],
               empty: Empty = np.empty) -> torch.Tensor:
        return torch.stack(list(draws))


class Buffers:
    """Batch arrays for a split's views, each handed out again once no batch uses it any more.

    A batch is tens of MB; allocated afresh, glibc's malloc returns it to the system when it is
    freed and the next batch faults its pages in one by one, which measured 40% of the cached
    loader's CPU time (bench/perf/loader.py's CREMA-D clips). An array is free again when its
    only holders are this pool: the tensors made from it (torch.from_numpy), and every view of
    them, hold a reference to it until they are gone. At most `keep` arrays of each shape are
    kept; beyond them (a consumer holding many batches) arrays are made and dropped as usual.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.kept: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        kept = self.kept.setdefault((tuple(shape), np.dtype(dtype).str), [])
        for arr in kept:
            if sys.getrefcount(arr) == 3:  # held by `kept`, by `arr` here and by getrefcount's argument
                return arr
        arr = np.empty(shape, dtype)
        if len(kept) < self.keep:
            kept.append(arr)
        return arr


class CachedSplit(torch.utils.data.Dataset):
    """Rows of a cache through per-modality views, one sample (`split[i]`) or a batch at a time."""

    def __init__(self, cache: Cache, rows: list[int], views: dict[str, View]) -> None:
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.views = views
        self.labels = torch.tensor([cache.meta.labels[r] for r in rows], dtype=torch.long)
        self.buffers = Buffers()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker keeps its own batch arrays
        return {**self.__dict__, "buffers": Buffers(self.buffers.keep)}

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        batch = self.batch([i])
        return {m: x[0] for m, x in batch.inputs.items()}, int(batch.labels[0])

    def batch(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> Batch:
        """Items `indices` as one batch, item i drawn under torch's RNG seeded with seeds[i] (as
        the RNG stands, without seeds): the same numbers as the items one by one, stacked."""
        cache, rows = self.cache, [int(self.rows[i]) for i in indices]
        views = {m: v if isinstance(v, BatchedView) else PerSample(v) for m, v in self.views.items()}
        draws: dict[str, list[Any]] = {m: [] for m in views}
        for row, seed in zip(rows, seeds if seeds is not None else [None] * len(rows)):
            with seeded(seed):
                for m, view in views.items():
                    count = cache.counts[m][row] if m in cache.counts else None
                    # resized frames: the views crop on the size they were resized from
                    source = tuple(int(v) for v in cache.sources[m][row]) if m in cache.sources else None
                    draws[m].append(view.draw(cache.arrays[m][row], count, source))
        inputs = {}
        for m, view in views.items():
            out = view.gather([cache.arrays[m][r] for r in rows], draws[m], self.buffers.empty)
            if isinstance(out, Drawn):  # a per-sample half's draws travel to its batch half
                inputs[m], inputs[draws_key(m)] = out
            else:
                inputs[m] = out
        return Batch(inputs, self.labels[list(indices)])


class PreparedDataset(Dataset):
    """Base class of datasets that train from a cache made by `mmbalance prepare`."""

    Params: ClassVar[type[BaseModel]] = CachedParams
    PIPELINES: ClassVar[dict[str, Pipeline]] = {}
    DEFAULT_PIPELINE: ClassVar[str] = ""
    KINDS: ClassVar[dict[str, ModalityKind]] = {}  # modality -> kind
    STATS_KINDS: ClassVar[tuple[ModalityKind, ...]] = ()  # kinds whose train mean/std go in meta.stats

    # ---- prepare side -------------------------------------------------------------------------

    @classmethod
    def pipeline(cls, name: str | None) -> Pipeline:
        name = name or cls.DEFAULT_PIPELINE
        if name not in cls.PIPELINES:
            raise DataError(
                f"dataset {cls.registry_name!r} has no pipeline {name!r}; allowed: {', '.join(sorted(cls.PIPELINES))}"
            )
        return cls.PIPELINES[name]

    @classmethod
    def configure(cls, name: str, pipeline_file: str | Path | None = None, options: Sequence[str] = ()) -> Pipeline:
        """The pipeline a prepare runs: the named one, with the options of `pipeline_file` and
        `options` (`key=value`) over it. The papers' datasets take none: their pipelines are the
        reference repos' and are used as they are."""
        pipe = cls.pipeline(name)
        if pipeline_file is not None or options:
            raise ConfigError(
                f"dataset {cls.registry_name!r} takes no pipeline options (--pipeline-file, --set); its "
                f"pipelines are the reference repos': {', '.join(sorted(cls.PIPELINES))} (--pipeline)"
            )
        return pipe

    @classmethod
    def default_root(cls, pipeline: str | None) -> Path:
        return Path("data") / cls.registry_name / (pipeline or cls.DEFAULT_PIPELINE)

    @classmethod
    @abstractmethod
    def plan(cls, raw: Path, pipeline: Pipeline) -> Plan:
        """Read the raw download's split files and layout into a Plan (no decoding here)."""

    @classmethod
    @abstractmethod
    def array_specs(cls, pipeline: Pipeline) -> dict[str, ArraySpec]:
        """Per modality, the array each cached row holds."""

    @classmethod
    @abstractmethod
    def load_sample(cls, source: SampleSource, pipeline: Pipeline) -> dict[str, np.ndarray | SizedFrames]:
        """Decode and preprocess one sample into arrays matching `array_specs` (SizedFrames for
        frames stored `resized`)."""

    # ---- training side ------------------------------------------------------------------------

    @abstractmethod
    def views(self, train: bool) -> dict[str, View]:
        """Per modality, the view that turns a cached row into the encoder's input."""

    @cached_property
    def cache(self) -> Cache:
        p = self.params
        root = Path(p.root).expanduser() if p.root else self.default_root(p.pipeline)
        if not root.is_dir():
            raise DataError(
                f"dataset {self.registry_name!r}: cache directory {str(root)!r} (dataset.root) does not exist; "
                f"make it with `mmbalance prepare {self.registry_name} --raw DIR --out {root}`"
            )
        cache = Cache(root)
        self.check_cache(cache)
        return cache

    def check_cache(self, cache: Cache) -> None:
        """Refuse a cache of another dataset or pipeline than the params ask for."""
        wanted = self.params.pipeline or self.DEFAULT_PIPELINE
        if cache.meta.dataset != self.registry_name or cache.meta.pipeline != wanted:
            raise DataError(
                f"cache {str(cache.root)!r} holds {cache.meta.dataset!r} pipeline {cache.meta.pipeline!r}, "
                f"but the config asks for {self.registry_name!r} pipeline {wanted!r} (dataset.pipeline)"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.cache.meta.classes)

    @property
    def modalities(self) -> tuple[Modality, ...]:
        views = self.views(train=False)
        specs = self.cache.specs
        kinds = self.cache.meta.kinds or self.KINDS
        names = self.modality_names(self.params)
        return tuple(Modality(m, kinds.get(m, "video"), views[m].shape(specs[m].shape)) for m in names)

    def split(self, name: str) -> CachedSplit:
        rows = self.cache.meta.splits.get(name, [])
        return CachedSplit(self.cache, rows, self.views(train=name == "train"))

    def loader_split(self, name: str, *, augment: bool, on_device: bool) -> tuple[CachedSplit, dict[str, Any]]:
        split = self.checked_split(name)  # a fresh split (refused if empty): its views are ours to set
        split.views = self.views(train=augment)
        halves = {m: v.deferred() for m, v in split.views.items() if on_device and hasattr(v, "deferred")}
        split.views.update({m: sample for m, (sample, _) in halves.items()})
        return split, {m: batch for m, (_, batch) in halves.items()}

    def describe(self) -> str:
        return f"{self.registry_name} cache {str(self.cache.root)!r}"


class AudioVisualDataset(PreparedDataset):
    """Base of the audio + video datasets (CREMA-D, Kinetics-Sounds, VGGSound, AVE): their modality
    names and kinds, and the reference repos' ResNet18 encoders by default."""

    MODALITIES: ClassVar[tuple[str, ...]] = ("audio", "visual")
    KINDS: ClassVar[dict[str, ModalityKind]] = {"audio": "audio", "visual": "video"}
    DEFAULT_ENCODERS: ClassVar[dict[str, dict[str, Any]]] = {"audio": {"name": "resnet18"},
                                                             "visual": {"name": "resnet18"}}
