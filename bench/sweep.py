"""Sweeps: a base config (or a paper recipe), named cells, a grid, include/exclude rows and
seeds -> run configs.

A sweep file looks like::

    group: ogmge
    recipe: ../recipes/ogmge_cremad.yaml     # the base; `base:` is merged over it (optional)
    seeds: [0, 1, 2]
    cells:                                   # named dotted overrides (optional)
      ogm-ge: {}
      joint: {method: {name: joint}}
      ogm-ge-3m: {label: ogm-ge, dataset.preset: three-modality}   # another dataset, the same row label
    grid:                                    # dotted key -> values; crossed with the cells
      model.fusion: [concat, sum, film, gated]
    exclude:                                 # drop the points matching every key of a row
      - {cell: joint, model.fusion: gated}
    include:                                 # extra points (optionally starting from a cell)
      - {cell: ogm-ge, method.alpha: 0.3, label: ogm-ge-alpha0.3}
    launcher: {name: local, workers: 2}      # see bench.launch.options.LauncherConfig
    tune: {trials: 20, lr_range: [1.0e-4, 0.1]}   # `mmbalance tune`'s budget: bench.tune_options

Every (point, seed) becomes one validated RunConfig labelled after its cell and grid values
(`ogm-ge/fusion=sum`); a cell's `label` key replaces its name in labels, so that cells on different
datasets (a cell may override `dataset.*`) give the same method the same row label in each
dataset's block, while the cell's own name stays its handle (`cells.<cell>.<key>=...`, `exclude`'s
`cell`). Two points of one dataset with one label are an error (they would be one row of the
report). `recipe` may also be a list: each recipe is then a base of its own and
labels start with its file name. In `exclude` rows a list matches any of its values (unless
the config value is itself a list) and `cell` matches the cell name. Run ids are hashes of the
resolved configs (bench.config.run_id), so the same point always has the same id.

Dotted overrides (`train.epochs=2`) apply to every run, over cells, grid and include rows; two
forms change the sweep itself, as if the file said so: `seeds=[0]` and
`cells.<cell>.<key>=value` (one cell's key, e.g. a staged method's stage lengths in a shorter
budget: `cells.mie.method.epoch_list=[1,1]`).

A sweep's runs write TensorBoard events (`train.tensorboard`, bench.tracking) unless the sweep sets the
key (`base: {train.tensorboard: false}`, or the override `train.tensorboard=false`), so that
`tensorboard --logdir results/GROUP` shows it live; the key is not part of the run id.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from tqdm.auto import tqdm

from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.launch.options import LauncherConfig
from mmbalance.bench.launch.plan import label
from mmbalance.bench.requirements import with_requirements
from mmbalance.bench.resources import shipped_config, shipped_configs
from mmbalance.bench.store import Store
from mmbalance.bench.tracking import check_trackers
from mmbalance.bench.train import DatasetSource, RunResult, build_checked, build_dataset, run
from mmbalance.bench.tune_options import TuneOptions
from mmbalance.core.errors import ConfigError, DataError, RunFailed
from mmbalance.core.overrides import (
    Sources,
    apply_overrides,
    assign,
    deep_merge,
    format_errors,
    parse_override,
    read_yaml,
)
from mmbalance.core.params import Strict
from mmbalance.datasets.base import Dataset

SWEEP_KEYS = frozenset({"recipe", "base", "seeds", "cells", "grid", "include", "exclude", "launcher", "tune"})

log = logging.getLogger(__name__)


class SweepConfig(Strict):
    group: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: str | list[str] | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    cells: dict[str, dict[str, Any]] | None = Field(None, min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    tune: TuneOptions | None = None  # `mmbalance tune`'s budget (bench.tune_options); `sweep` ignores it

    @model_validator(mode="after")
    def _has_runs(self) -> SweepConfig:
        bad = [name for name, cell in (self.cells or {}).items()
               if "label" in cell and not (isinstance(cell["label"], str) and cell["label"])]
        if bad:
            raise ValueError(f"cell(s) {bad}: a cell's label must be a non-empty string (its rows' label)")
        empty = [key for key, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"grid key(s) {empty} have no values; give each a non-empty list")
        if self.cells is None and not self.grid and not self.include and self.recipe is None and not self.base:
            raise ValueError("a sweep needs a base or recipe and at least one of cells, grid or include")
        return self


@dataclass
class Point:
    """One point of a sweep before seeds: its label, its merged (unvalidated) data and where
    each key came from."""

    label: str | None
    data: dict[str, Any]
    sources: Sources
    cell: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the cell/grid/include overrides


def is_sweep_file(path: str | Path) -> bool:
    return bool(SWEEP_KEYS & read_yaml(Path(path)).keys())


# a cell's overrides from the command line: [({dotted key: value}, "override '...'"), ...]
CellOverrides = dict[str, list[tuple[dict[str, Any], str]]]


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[SweepConfig, list[RunConfig]]:
    """Read a sweep file; `overrides` apply to every run (over cells, grid and include rows),
    except `seeds=...` and `cells.<cell>.<key>=...`, which change the sweep (module docstring)."""
    origin = f"file {str(path)!r}"
    data = read_yaml(Path(path))
    sources = Sources()
    sources.record(data, origin)
    run_overrides, by_cell = split_overrides(data, sources, overrides)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, SweepConfig, sources)) from None
    return sweep, expand(sweep, run_overrides, origin, Path(path).parent, by_cell)


def split_overrides(data: dict[str, Any], sources: Sources,
                    overrides: Sequence[str]) -> tuple[list[str], CellOverrides]:
    """Set `seeds=...` in the sweep's data; return the overrides of every run and, per cell,
    those of `cells.<cell>.<key>=...`."""
    runs: list[str] = []
    by_cell: CellOverrides = {}
    for text in overrides:
        keys, value = parse_override(text)
        where = f"override {text!r}"
        if keys == ["seeds"]:
            assign(data, sources, "seeds", value, where)
        elif keys[0] == "seeds":
            raise ConfigError(f"{where}: the seeds are one list; write seeds=[0,1]")
        elif keys[0] == "cells":
            cells = data.get("cells") if isinstance(data.get("cells"), dict) else {}
            if len(keys) < 3 or keys[1] not in cells:
                raise ConfigError(f"{where}: write cells.<cell>.<key>=value with one of the sweep's cells: "
                                  f"{', '.join(cells) or '(none)'}")
            by_cell.setdefault(keys[1], []).append(({".".join(keys[2:]): value}, where))
        else:
            runs.append(text)
    return runs, by_cell


def expand(sweep: SweepConfig, overrides: Sequence[str] = (), origin: str = "the sweep",
           where: Path = Path("."), by_cell: CellOverrides | None = None) -> list[RunConfig]:
    """Every point x every seed, validated, in file order; two points resolving to the same
    config are an error (they would share a run directory)."""
    configs: list[RunConfig] = []
    seen: dict[str, str | None] = {}
    rows: dict[tuple[str | None, str, int], str | None] = {}  # (label, dataset, seed) -> cell
    by_cell = by_cell or {}
    for point in points(sweep, origin, where, by_cell):
        for seed in sweep.seeds:
            data = json.loads(json.dumps(point.data))
            sources = point.sources
            apply_overrides(data, sources, overrides)
            track_by_default(data, sources)
            deep_merge(data, {"group": sweep.group, "label": point.label, "train": {"seed": seed}})
            try:
                cfg = validate(data, sources)
            except ConfigError as e:
                raise ConfigError(f"run {point.label or '(base)'!r} seed {seed}: {e}") from None
            rid = cfg.run_id()
            if rid in seen:
                raise ConfigError(
                    f"{origin}: runs {seen[rid]!r} and {point.label!r} (seed {seed}) resolve to the same "
                    f"config (run id {rid}); drop one of them with an `exclude` row")
            seen[rid] = point.label
            row = (point.label, json.dumps(cfg.dataset, sort_keys=True), seed)
            if row in rows:
                raise ConfigError(
                    f"{origin}: cells {rows[row]!r} and {point.cell!r} both give label {point.label!r} on dataset "
                    f"{cfg.dataset} (seed {seed}); a report row is one (dataset, label): give one a `label` of its own")
            rows[row] = point.cell
            configs.append(cfg)
    check_excludes(sweep, origin, where, by_cell)
    return configs


def track_by_default(data: dict[str, Any], sources: Sources) -> None:
    """A sweep's runs write TensorBoard events (bench.tracking) unless its file or overrides set
    `train.tensorboard`; a single run's default is off. The key stays out of the run id."""
    if isinstance(data.get("train", {}), dict) and lookup(data, "train.tensorboard") is MISSING:
        assign(data, sources, "train.tensorboard", True, "a sweep's default")


def points(sweep: SweepConfig, origin: str, where: Path, by_cell: CellOverrides) -> list[Point]:
    """Bases x cells x grid, minus `exclude`, plus `include`."""
    found: list[Point] = []
    bases = load_bases(sweep, origin, where)
    cells = sweep.cells or {None: {}}
    grid = [dict(zip(sweep.grid, combo)) for combo in itertools.product(*sweep.grid.values())]
    leaves = grid_leaf_names(list(sweep.grid))
    for prefix, base, base_sources in bases:
        for name, cell in cells.items():
            for values in grid:
                label = make_label([prefix, cell_label(name, cell),
                                    ",".join(f"{leaves[k]}={short(v)}" for k, v in values.items())])
                point = make_point(base, base_sources, label, name, [
                    *cell_layers(name, cell, origin, by_cell), (values, f"{origin}, grid")])
                found.append(point)
        for i, row in enumerate(sweep.include):
            found.append(include_point(sweep, i, row, prefix, base, base_sources, origin, by_cell))
    return [p for p in found if not any(matches(row, p) for row in sweep.exclude)]


def cell_layers(name: str | None, cell: dict[str, Any], origin: str,
                by_cell: CellOverrides) -> list[tuple[dict[str, Any], str]]:
    """A cell's overrides as the file gives them (its `label` is not one), then as the command line
    changes them."""
    overrides = {k: v for k, v in cell.items() if k != "label"}
    return [(overrides, f"{origin}, cell {name!r}"), *by_cell.get(name, [])]


def cell_label(name: str | None, cell: dict[str, Any]) -> str | None:
    """A cell's row label: its `label` key, else its name."""
    return cell.get("label", name)


def check_excludes(sweep: SweepConfig, origin: str, where: Path, by_cell: CellOverrides) -> None:
    """An exclude row that matches nothing is a typo (in a key, a value or a cell name)."""
    found = points(SweepConfig.model_validate({**sweep.model_dump(), "exclude": []}), origin, where, by_cell)
    for i, row in enumerate(sweep.exclude):
        if not any(matches(row, p) for p in found):
            raise ConfigError(f"{origin}: exclude[{i}] {row} matches no run; check its keys and values")


def load_bases(sweep: SweepConfig, origin: str, where: Path) -> list[tuple[str | None, dict, Sources]]:
    """(label prefix, data, sources) per base: each recipe with `base` merged over it, or `base`."""
    recipes = [sweep.recipe] if isinstance(sweep.recipe, str) else list(sweep.recipe or [None])
    bases = []
    for recipe in recipes:
        data: dict[str, Any] = {}
        sources = Sources()
        if recipe is not None:
            path = find_recipe(recipe, where, origin)
            data = read_yaml(path)
            sources.record(data, f"recipe {str(path)!r}")
        base = json.loads(json.dumps(sweep.base))
        sources.record(base, f"{origin}, base")
        deep_merge(data, base)
        prefix = Path(recipe).stem if recipe is not None and len(recipes) > 1 else None
        bases.append((prefix, data, sources))
    return bases


def find_recipe(recipe: str, where: Path, origin: str) -> Path:
    """A recipe path is relative to the sweep file's folder, else to the working directory, else
    the name of a shipped recipe (`ogmge_cremad`, `recipes/ogmge_cremad.yaml`)."""
    tried = [where / recipe, Path(recipe)]
    for path in tried:
        if path.is_file():
            return path
    for name in (recipe, f"recipes/{recipe}"):
        if (shipped := shipped_config(name)) is not None:
            return shipped
    raise ConfigError(f"recipe {recipe!r} (from {origin}) does not exist; tried "
                      + ", ".join(repr(str(p)) for p in tried) + " and the shipped recipes: "
                      + ", ".join(n for n in shipped_configs() if n.startswith("recipes/")))


def include_point(sweep: SweepConfig, i: int, row: dict[str, Any], prefix: str | None,
                  base: dict, base_sources: Sources, origin: str, by_cell: CellOverrides) -> Point:
    row = dict(row)
    cell_name = row.pop("cell", None)
    cells = sweep.cells or {}
    if cell_name is not None and cell_name not in cells:
        raise ConfigError(f"{origin}: include[{i}] names cell {cell_name!r}, which the sweep does not have; "
                          f"cells: {', '.join(cells) or '(none)'}")
    label = row.pop("label", None) or make_label(
        [prefix, cell_name, ",".join(f"{k.split('.')[-1]}={short(v)}" for k, v in row.items())])
    if label and prefix and not label.startswith(prefix):
        label = f"{prefix}/{label}"
    layers = [*cell_layers(cell_name, cells.get(cell_name, {}), origin, by_cell), (row, f"{origin}, include[{i}]")]
    return make_point(base, base_sources, label, cell_name, layers)


def make_point(base: dict, base_sources: Sources, label: str | None, cell: str | None,
               layers: list[tuple[dict[str, Any], str]]) -> Point:
    data = json.loads(json.dumps(base))
    sources = copy.deepcopy(base_sources)  # each point records its own overrides
    values: dict[str, Any] = {}
    for overrides, where in layers:
        for dotted, value in overrides.items():
            assign(data, sources, dotted, json.loads(json.dumps(value)), where)
            values[dotted] = value
    return Point(label, data, sources, cell, values)


def matches(row: dict[str, Any], point: Point) -> bool:
    """Whether every key of an exclude row matches the point (`cell`: its cell name)."""
    for key, wanted in row.items():
        actual = point.cell if key == "cell" else lookup(point.data, key)
        if actual is MISSING:
            return False
        if isinstance(wanted, list) and not isinstance(actual, list):
            if actual not in wanted:
                return False
        elif actual != wanted:
            return False
    return True


MISSING = object()


def lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def grid_leaf_names(keys: list[str]) -> dict[str, str]:
    """Each grid key's short name in labels: its last part, or the whole key where two share it."""
    leaves = [k.split(".")[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def short(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def make_label(parts: list[str | None]) -> str | None:
    label = "/".join(p for p in parts if p)
    return label or None


def labels_in_order(configs: Sequence[RunConfig]) -> list[str]:
    """The distinct labels of a sweep's runs, in expansion order (the rows of its table)."""
    return list(dict.fromkeys(c.label or c.method["name"] for c in configs))


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


def check_runs(configs: Sequence[RunConfig], datasets: DatasetSource | None = None, *,
               need_data: bool = True) -> list[str]:
    """The check every launcher and `--dry-run` make before anything starts: build each distinct
    model of `configs` once (encoders and method; no training), so that a config the method
    rejects when it is built (MIE's epoch_list not adding up to train.epochs, DI-MML's stage
    lengths, an encoder that does not fit its modality) stops everything. Raises ConfigError
    naming the cell's first run (label and seed) and the method's message, which names the key.

    A model needs its dataset's modalities and classes, not its samples: the dataset is opened
    (through `datasets`, so that the inline launcher trains on the very objects checked), which
    for a prepared cache reads its metadata only. Where the data is not here (DataError), that is
    an error with `need_data` (the runs would fail); without it (a dry run, a SLURM submission
    whose jobs may see other disks) those cells go unchecked and one note per cause is returned."""
    check_trackers(configs)  # a tracker package missing here would fail every run in turn
    datasets = datasets or DatasetCache()
    unchecked: dict[str, list[str]] = {}
    seen = set()
    for cfg in configs:
        key = json.dumps([cfg.dataset, cfg.model.model_dump(mode="json"), cfg.method, cfg.train.epochs], sort_keys=True)
        if key in seen:  # only these reach the model: seeds, optimiser and the rest cannot change its verdict
            continue
        seen.add(key)
        run_name = f"run {label(cfg)!r} seed {cfg.train.seed}"
        try:
            build_checked(cfg, datasets)
        except ConfigError as e:
            raise ConfigError(f"{run_name}: {e}") from None
        except DataError as e:
            if need_data:
                raise DataError(f"{run_name}: {e}") from None
            unchecked.setdefault(str(e), []).append(label(cfg))
    return [f"not checked here (no data): {len(cells)} cell(s) ({', '.join(cells[:3])}"
            f"{', ...' if len(cells) > 3 else ''}): {cause}" for cause, cells in unchecked.items()]


def run_inline(configs: Sequence[RunConfig], store: Store, *, keep_going: bool = True,
               workers: int = 1) -> list[RunResult]:
    """Run every config here, and the runs they require before them (bench.requirements;
    finished ones are skipped): one after another in this process, or with `workers` > 1 in that
    many worker processes (bench.parallel). A failed run is reported and, with `keep_going`, the
    others still run; its status file names the cause (a run whose requirement failed fails in
    one line naming it)."""
    configs = with_requirements(configs)
    datasets = DatasetCache()
    check_runs(configs, datasets)
    failures: list[str] = []

    def failed(e: RunFailed) -> None:
        if not keep_going:
            raise e
        failures.append(str(e))
        log.warning(f"FAILED: {e}")

    if workers > 1 and len(configs) > 1:
        from mmbalance.bench.parallel import run_in_workers

        results = run_in_workers(configs, store, min(workers, len(configs)), failed)
    else:
        results = []
        bar = tqdm(configs, desc="runs", unit="run", dynamic_ncols=True)
        for cfg in bar:
            bar.set_postfix_str(f"{cfg.label or cfg.method['name']} seed {cfg.train.seed}")
            try:
                results.append(run(cfg, store, datasets=datasets))
                if results[-1].note:
                    log.info(f"{cfg.label or cfg.method['name']} seed {cfg.train.seed} {results[-1].run_id}: "
                             f"{results[-1].note}")
            except RunFailed as e:
                failed(e)
    if failures:
        raise RunFailed(f"{len(failures)} of {len(configs)} runs failed:\n  " + "\n  ".join(failures))
    return results
