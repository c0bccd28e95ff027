"""`mmbalance prepare`: raw download -> cache, in parallel, resumable, with a report.

Order of work: plan (split files -> samples), check that every file exists, create or reopen the
cache, decode the samples not yet done (worker processes, by default one per available core;
rows are written at their own index, so the cache does not depend on the number of workers or
on completion order), store the train split's mean and std of the modalities the dataset
normalises, then report per split how many were listed, prepared, missing and corrupt, and how
the split compares with the published one.
Missing and corrupt files are listed by path in `report.json`; with `on_error="skip"` they are
left out (and counted in the cache's metadata), with `"fail"` the prepare stops with an error and
the cache stays unfinished (everything already decoded is kept for the next attempt).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mmbalance.core.errors import DataError
from mmbalance.core.overrides import flat
from mmbalance.core.registry import DATASETS
from mmbalance.datasets.cache import CacheMeta, CacheWriter, write_json_atomic
from mmbalance.datasets.prepared import Pipeline, Plan, PreparedDataset, SampleSource
from mmbalance.datasets.splits import compare_with_published, load_manifest

OnError = Literal["skip", "fail"]
CHUNK = 8  # samples per task sent to a worker process (fewer when there are few to share out)


@dataclass
class PrepareReport:
    out: Path
    dataset: str
    pipeline: str
    counts: dict[str, dict[str, int]]  # split -> listed / prepared / missing / corrupt
    missing: dict[str, list[str]]  # id -> missing paths
    corrupt: dict[str, str]  # id -> what failed (names the file)
    split_info: dict[str, Any]
    seconds: float
    processed: int  # samples decoded by this call (0 when everything was already done)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # every pipeline option, dotted, as the cache records it

    @property
    def samples_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "pipeline": self.pipeline, "counts": self.counts,
            "missing": self.missing, "corrupt": self.corrupt, "split_info": self.split_info,
            "seconds": self.seconds, "processed": self.processed, "notes": self.notes, "options": self.options,
        }

    def summary(self) -> str:
        lines = [f"{self.dataset} / {self.pipeline} -> {self.out}"]
        if self.options:
            lines.append("  pipeline options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()))
        published = self.split_info.get("splits", {})
        for split, c in self.counts.items():
            expected = published.get(split, {}).get("published_count")
            exp = f" (published: {expected})" if expected is not None else ""
            lines.append(f"  {split:5s} listed {c['listed']}{exp}, prepared {c['prepared']}, "
                         f"missing {c['missing']}, corrupt {c['corrupt']}")
        lines.append("  " + split_verdict(self.split_info))
        for note in self.notes:
            lines.append(f"  note: {note}")
        for paths in list(self.missing.values())[:10]:
            lines.append(f"  missing: {', '.join(paths)}")
        for why in list(self.corrupt.values())[:10]:
            lines.append(f"  corrupt: {why}")
        if len(self.missing) + len(self.corrupt) > 20:
            lines.append(f"  ... all {len(self.missing)} missing and {len(self.corrupt)} corrupt in "
                         f"{self.out / 'report.json'}")
        lines.append(f"  {self.processed} samples decoded in {self.seconds:.1f} s ({self.samples_per_s:.1f} samples/s)")
        return "\n".join(lines)


def recorded_options(pipeline_params: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's options as dotted keys, the way `--set` names them (`manifest` records its
    options under "options"; the other datasets record their pipeline's parameters directly)."""
    return flat(pipeline_params.get("options", pipeline_params))


def split_verdict(split_info: dict[str, Any]) -> str:
    """Whether the split is the published one; for data with no published split (VGGSound's csv,
    your own CSV) it says so instead of claiming a match."""
    source = split_info.get("source", "?")
    published = split_info.get("is_published_split")
    if published is None:
        return f"split: {source}, not a published split (nothing to compare with; see the notes for any carving)"
    return f"split is the published one ({source}): {'yes' if published else 'no'}"


def prepare(
    name: str,
    raw: str | Path,
    out: str | Path | None = None,
    pipeline: str | None = None,
    workers: int | None = None,
    on_error: OnError = "skip",
    progress: bool = True,
    options: Sequence[str] = (),
    pipeline_file: str | Path | None = None,
) -> PrepareReport:
    """Prepare dataset `name` from `raw` into `out`. `pipeline` names a preset (default: the
    dataset's); `pipeline_file` (YAML) and `options` (`key=value`, dotted) set pipeline options
    over it, for datasets that take them (`manifest`). `workers`: decoding processes (default:
    the cores this process may use)."""
    cls = DATASETS.get(name, "prepare NAME")
    if not (isinstance(cls, type) and issubclass(cls, PreparedDataset)):
        raise DataError(f"dataset {name!r} has nothing to prepare (it needs no download)")
    pipe_name = pipeline or cls.DEFAULT_PIPELINE
    pipe = cls.configure(pipe_name, pipeline_file, options)
    workers = available_cores() if workers is None else workers
    raw = Path(raw).expanduser()
    if not raw.exists():
        raise DataError(f"raw download {str(raw)!r} (--raw) does not exist")
    out = Path(out).expanduser() if out else cls.default_root(pipe_name)
    start = time.perf_counter()

    plan = cls.plan(raw, pipe)
    split_info = compare_with_published(plan.splits, load_manifest(name).flavour(plan.flavour or pipe.flavour))
    meta = _meta(cls, pipe_name, pipe, plan)
    writer = CacheWriter(out, meta)
    sources = {s.id: s for s in plan.samples}
    row_of = {sid: i for i, sid in enumerate(meta.ids)}
    missing = {sid: [str(p) for p in s.files.values() if not Path(p).exists()] for sid, s in sources.items()}
    missing = {sid: paths for sid, paths in missing.items() if paths}
    todo = [meta.ids[r] for r in writer.pending() if meta.ids[r] not in missing]

    corrupt: dict[str, str] = {}
    processed = 0
    try:
        bar = tqdm(total=len(todo), desc=f"prepare {name}/{pipe_name}", unit="sample", disable=not progress)
        for sid, arrays, error in _decode(cls, [sources[s] for s in todo], pipe, workers):
            if error is None:
                try:
                    writer.write(row_of[sid], arrays)
                    processed += 1
                except DataError as e:
                    error = str(e)
            if error is not None:
                corrupt[sid] = error
            bar.update()
        bar.close()
    finally:
        writer.flush()  # an interrupt keeps every finished sample

    report = PrepareReport(out, name, pipe_name, _counts(plan, writer.done, row_of, missing, corrupt),
                           missing, corrupt, split_info, time.perf_counter() - start, processed, plan.notes,
                           recorded_options(meta.pipeline_params))
    write_json_atomic(out / "report.json", report.to_dict())
    if (missing or corrupt) and on_error == "fail":
        raise DataError(
            f"prepare {name}: {len(missing)} samples with missing files and {len(corrupt)} corrupt "
            f"(first: {_first_problem(missing, corrupt)}); all listed in {out / 'report.json'}. "
            f"The cache at {out} stays unfinished; fix the files and run again, or use --on-error skip"
        )
    skipped = {sid: f"missing {', '.join(p)}" for sid, p in missing.items()} | corrupt
    writer.finish(skipped, split_info, [m for m, kind in meta.kinds.items() if kind in cls.STATS_KINDS])
    return report


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM allocation), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


def _meta(cls: type[PreparedDataset], pipe_name: str, pipe: Pipeline, plan: Plan) -> CacheMeta:
    ids: list[str] = []
    seen: set[str] = set()
    for split, split_ids in plan.splits.items():
        for i in split_ids:
            if i in seen:
                raise DataError(f"{cls.registry_name}: sample {i!r} is listed twice (again in split {split!r})")
            seen.add(i)
            ids.append(i)
    by_id = {s.id: s for s in plan.samples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise DataError(f"{cls.registry_name}: split lists name samples the plan has no source for: {unknown[:5]}")
    row_of = {sid: i for i, sid in enumerate(ids)}
    return CacheMeta(
        dataset=cls.registry_name,
        pipeline=pipe_name,
        pipeline_params=pipe.model_dump(mode="json"),  # as meta.json reads back (lists, not tuples)
        classes=plan.classes,
        arrays={m: s.to_dict() for m, s in (plan.arrays or cls.array_specs(pipe)).items()},
        kinds=dict(plan.kinds or cls.KINDS),
        ids=ids,
        labels=[by_id[i].label for i in ids],
        splits={s: [row_of[i] for i in split_ids] for s, split_ids in plan.splits.items()},
    )


def _decode(
    cls: type[PreparedDataset], todo: list[SampleSource], pipe: Pipeline, workers: int
) -> Iterator[tuple[str, dict[str, np.ndarray] | None, str | None]]:
    """(id, arrays, error) per sample, in completion order; errors name the sample's files."""
    if workers <= 1:
        with _single_threaded():
            for source in todo:
                yield source.id, *_load_one(cls, source, pipe)
        return
    # samples travel in chunks: one round trip per sample costs as much as decoding a short clip
    size = max(1, min(CHUNK, len(todo) // (4 * workers)))
    chunks = iter([todo[i : i + size] for i in range(0, len(todo), size)])
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded_worker) as pool:
        running: set[Future] = set()

        def submit_next() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                running.add(pool.submit(_load_chunk, cls, chunk, pipe))

        for _ in range(4 * workers):  # a bounded number in flight keeps memory flat on large datasets
            submit_next()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                running.discard(fut)
                yield from fut.result()
                submit_next()


@contextmanager
def _single_threaded() -> Iterator[None]:
    # one clip's ops are too small for torch's intra-op threads: on a busy machine they spin
    # waiting for each other, which costs several times the work itself
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_threaded_worker() -> None:
    # Workers are forked. A parent that already ran a multi-threaded torch op leaves OpenMP in a
    # state where the child's first parallel region hangs forever. One thread per worker avoids
    # those regions (and the workers' threads competing for the same cores).
    torch.set_num_threads(1)


def _load_chunk(
    cls: type[PreparedDataset], sources: list[SampleSource], pipe: Pipeline
) -> list[tuple[str, dict[str, np.ndarray] | None, str | None]]:
    return [(source.id, *_load_one(cls, source, pipe)) for source in sources]


def _load_one(
    cls: type[PreparedDataset], source: SampleSource, pipe: Pipeline
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    try:
        return cls.load_sample(source, pipe), None
    except Exception as e:  # any decoder failure is a corrupt file, reported with its paths
        files = ", ".join(str(p) for p in source.files.values())
        return None, f"{source.id} ({files}): {type(e).__name__}: {e}"


def _counts(plan: Plan, done: np.ndarray, row_of: dict[str, int], missing: dict,
            corrupt: dict) -> dict[str, dict[str, int]]:
    return {
        split: {
            "listed": len(ids),
            "prepared": sum(bool(done[row_of[i]]) for i in ids),
            "missing": sum(i in missing for i in ids),
            "corrupt": sum(i in corrupt for i in ids),
        }
        for split, ids in plan.splits.items()
    }


def _first_problem(missing: dict[str, list[str]], corrupt: dict[str, str]) -> str:
    if missing:
        return f"missing {next(iter(missing.values()))[0]}"
    return next(iter(corrupt.values()))
