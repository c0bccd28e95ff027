"""Sweeps: a base config, named cells (each a set of dotted overrides) and seeds -> run configs.

A sweep file looks like::

    group: quickstart
    base: {dataset: {name: avdigits}, train: {epochs: 40}}
    seeds: [0, 1, 2]
    cells:
      joint-concat: {method.name: joint, model.fusion: concat}
      unimodal-audio: {method.name: unimodal, method.modality: audio}

Every (cell, seed) becomes one validated RunConfig labelled with the cell's name. The inline
launcher runs them one after another in this process, sharing datasets between runs that use
the same dataset config; finished runs are skipped and unfinished ones resume (bench.store).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from tqdm.auto import tqdm

from bench.config import (
    ConfigError,
    RunConfig,
    Sources,
    Strict,
    apply_overrides,
    assign,
    deep_merge,
    format_errors,
    read_yaml,
    validate,
)
from bench.errors import RunFailed
from bench.store import Store
from bench.train import RunResult, build_dataset, build_method, run
from datasets.base import Dataset


class SweepConfig(Strict):
    group: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    cells: dict[str, dict[str, Any]] = Field(min_length=1)


def is_sweep_file(path: str | Path) -> bool:
    return "cells" in read_yaml(Path(path))


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepConfig, list[RunConfig]]:
    """Read a sweep file; `overrides` apply to every run (over the cells)."""
    origin = f"file {str(path)!r}"
    data = read_yaml(Path(path))
    sources = Sources()
    sources.record(data, origin)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, SweepConfig, sources)) from None
    return sweep, expand(sweep, overrides, origin)


def expand(sweep: SweepConfig, overrides: Sequence[str] = (), origin: str = "the sweep") -> list[RunConfig]:
    configs = []
    for label, cell in sweep.cells.items():
        for seed in sweep.seeds:
            data: dict[str, Any] = json.loads(json.dumps(sweep.base))
            sources = Sources()
            sources.record(data, f"{origin}, base")
            for dotted, value in cell.items():
                assign(data, sources, dotted, value, f"{origin}, cell {label!r}")
            apply_overrides(data, sources, overrides)
            deep_merge(data, {"group": sweep.group, "label": label, "train": {"seed": seed}})
            configs.append(validate(data, sources))
    return configs


class DatasetCache:
    """Builds each distinct dataset config once per process: runs of a sweep share the tensors
    (methods never modify their inputs)."""

    def __init__(self) -> None:
        self._built: dict[str, Dataset] = {}

    def __call__(self, cfg: RunConfig) -> Dataset:
        key = json.dumps(cfg.dataset, sort_keys=True)
        if key not in self._built:
            self._built[key] = build_dataset(cfg)
        return self._built[key]


def check_buildable(configs: Sequence[RunConfig], datasets: DatasetCache) -> None:
    """Build each cell's model once (no training), so that a config the method rejects (stage
    lengths that do not add up to train.epochs, say) stops the sweep before any run starts."""
    checked = set()
    for cfg in configs:
        if cfg.label in checked:
            continue
        checked.add(cfg.label)
        try:
            build_method(cfg, datasets(cfg))
        except ConfigError as e:
            raise ConfigError(f"cell {cfg.label!r}: {e}") from None


def run_inline(configs: Sequence[RunConfig], store: Store, *, keep_going: bool = True) -> list[RunResult]:
    """Run every config here, one after another. A failed run is reported and, with
    `keep_going`, the others still run; its status file names the cause."""
    datasets = DatasetCache()
    check_buildable(configs, datasets)
    results, failures = [], []
    bar = tqdm(configs, desc="runs", unit="run", dynamic_ncols=True)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.label or cfg.method['name']} seed {cfg.train.seed}")
        try:
            results.append(run(cfg, store, datasets=datasets))
        except RunFailed as e:
            if not keep_going:
                raise
            failures.append(str(e))
            tqdm.write(f"FAILED: {e}")
    if failures:
        raise RunFailed(f"{len(failures)} of {len(configs)} runs failed:\n  " + "\n  ".join(failures))
    return results
