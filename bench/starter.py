"""Starter sweeps for a prepared cache (`mmbalance init`, and the runs of `mmbalance diagnose`).

From a cache's metadata and a few measurements on this machine, a sweep that trains without edits:

* encoders sized to the inputs and the data (`choose_encoders`): the small ones (`small_cnn` for
  images, spectrograms and videos, `mlp` for vectors) everywhere except on a GPU with large
  inputs and enough samples, where the reference repos' `resnet18` is worth its cost; every
  encoder gets the same feature size, which MLA's shared head and DI-MML need;
* a batch that gives an epoch at least `MIN_STEPS` steps;
* a learning rate from a range test of the joint model (bench.lr_range);
* epochs that fit a time budget, from a few timed steps of every cell (bench.budget);
* every registered method that can be built for these modalities, each with its stages fitted to
  the epochs (`epoch_settings`), plus a unimodal-only reference per modality, `SEEDS` seeds.

The file written explains each choice in its comments (`render`), and is read back with
bench.sweep.load_sweep before this returns, so a file it writes is one `mmbalance sweep` accepts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbalance.bench.budget import EpochFit, RunCost, fit_epochs, time_overhead, time_run
from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.device import resolve_device
from mmbalance.bench.lr_range import RangeTest, range_test
from mmbalance.bench.store import atomic_write_text
from mmbalance.bench.sweep import DatasetCache, SweepConfig, expand, load_sweep
from mmbalance.bench.train import build_checked
from mmbalance.core.errors import ConfigError, DataError
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Modality
from mmbalance.datasets.base import SPLITS
from mmbalance.datasets.cache import read_meta

log = logging.getLogger(__name__)

SEEDS = 3
LARGE_SIDE = 64  # an input whose smaller side has at least this many pixels is "large"
MANY_SAMPLES = 2000  # training samples from which ResNet18 (11M parameters) and the wider small CNN pay off
SMALL_FEATURES, RESNET_FEATURES = 64, 512
MIN_STEPS = 8  # steps per epoch the batch size leaves at least (halving it from MAX_BATCH)
MAX_BATCH, MIN_BATCH = 64, 8
MAX_EPOCHS = 100  # the papers' budget; more is never proposed
PLACEHOLDER_LR = 0.01
OPTIMISER = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4}  # the reference repos' optimiser
DIAGNOSE_METHODS = ("joint", "unimodal")


# ---- the cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheInfo:
    """What a starter sweep is sized by: the dataset section, modalities, classes, split sizes."""

    root: Path
    dataset: dict[str, Any]
    modalities: tuple[Modality, ...]
    classes: tuple[str, ...]
    sizes: dict[str, int]

    @property
    def name(self) -> str:
        """A group-name-safe short name of the cache (its folder's name)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.root.name).strip("_.") or "cache"

    def lines(self) -> list[str]:
        sizes = " / ".join(f"{self.sizes[s]:,} {s}" for s in SPLITS)
        return [f"{self.dataset['name']} cache {str(self.root)!r} (pipeline {self.dataset['pipeline']}): "
                f"{sizes} samples, "
                f"{len(self.classes)} classes",
                *[f"  {m.name}: {m.kind}, input {tuple(m.shape)}" for m in self.modalities]]


def inspect_cache(root: str | Path, datasets: DatasetCache) -> CacheInfo:
    """Read a prepared cache's metadata and open it as a run would (its modalities' input shapes
    come from the dataset's views). A path that holds no finished cache is a DataError."""
    root = Path(root).expanduser().resolve()
    meta = read_meta(root)
    if not meta.complete:
        raise DataError(f"cache {str(root)!r} is unfinished; run its `mmbalance prepare` again to finish it")
    section = {"name": meta.dataset, "root": str(root), "pipeline": meta.pipeline}
    cfg = validate({"dataset": section, "method": {"name": "joint"}})
    dataset = datasets(cfg)
    sizes = {s: len(meta.splits.get(s, [])) for s in SPLITS}
    empty = [s for s, n in sizes.items() if n == 0]
    if empty:
        raise DataError(f"cache {str(root)!r} has no {' and no '.join(empty)} samples; "
                        "a sweep needs train, val and test")
    return CacheInfo(root, section, dataset.modalities, dataset.class_names, sizes)


# ---- encoders, batch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderChoice:
    section: dict[str, Any]
    why: str


def is_image_like(m: Modality) -> bool:
    return len(m.shape) in (3, 4)  # (C, H, W) or (C, T, H, W): images, spectrograms, videos


def choose_encoders(modalities: Sequence[Modality], n_train: int, gpu: bool) -> dict[str, EncoderChoice]:
    """One encoder per modality, by the rule `render` states in the file."""
    large = {m.name: is_image_like(m) and min(m.shape[-2:]) >= LARGE_SIDE for m in modalities}
    resnet = gpu and n_train >= MANY_SAMPLES
    dim = RESNET_FEATURES if resnet and any(large.values()) else SMALL_FEATURES
    chosen = {}
    for m in modalities:
        side = "x".join(map(str, m.shape[-2:]))
        if not is_image_like(m):
            chosen[m.name] = EncoderChoice({"name": "mlp", "hidden": 2 * dim, "out_dim": dim},
                                           f"a vector of {math.prod(m.shape)} values: an MLP")
        elif resnet and large[m.name]:
            chosen[m.name] = EncoderChoice({"name": "resnet18"}, f"{side} input, {n_train:,} training samples "
                                           "and a GPU: the reference repos' ResNet18")
        else:
            wide = n_train >= MANY_SAMPLES
            why = (f"{side} input" + (" on a CPU" if not gpu else "") +
                   (f", {n_train:,} training samples" if not resnet or not large[m.name] else "") +
                   f": the small CNN{', twice as wide' if wide else ''}")
            chosen[m.name] = EncoderChoice({"name": "small_cnn", "channels": [32, 64] if wide else [16, 32],
                                            "out_dim": dim}, why)
    return chosen


def batch_size_for(n_train: int) -> int:
    """MAX_BATCH, halved until an epoch has at least MIN_STEPS steps (never below MIN_BATCH)."""
    batch = MAX_BATCH
    while batch > MIN_BATCH and n_train / batch < MIN_STEPS:
        batch //= 2
    return batch


# ---- methods and their stages -------------------------------------------------------------------


def epoch_settings(method: str, epochs: int, modalities: Sequence[str],
                   encoders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The method's settings that depend on the epoch budget and the encoders, as the papers (or
    the suite's quickstart) split their budgets; {} for a method that has none."""
    if method == "ogm_ge":  # modulation over the first half, as the paper's epochs 0-50 of 100
        settings: dict[str, Any] = {"modulation_ends": epochs // 2}
        if any(e["name"] == "mlp" for e in encoders.values()):  # an MLP has no conv kernels to modulate
            settings["param_filter"] = "all_encoder"
        return settings
    if method == "inforeg" and set(modalities) != {"audio", "visual"}:
        # the release's coefficients and window are for audio and visual; for other data, which
        # modality leads is not known: its audio coefficient for all, the window from every encoder
        return {"alpha": 0.95, "window_trace": "all"}
    if method == "opm":  # no drop in the first 6% of the epochs, as the release's 0-5 of 100
        return {"modulation_starts": epochs * 6 // 100}
    if method == "greedy":
        # the release's running average reads the first modality's gates for both, which needs the
        # two encoders' stages to have equal widths; an own dataset's encoders seldom do
        return {"running_average": "own"}
    if method == "remix":  # warm-up for a sixth of the epochs, as the release's 10 of 60
        return {"warmup": epochs // 6}
    if method == "relearning":
        return relearning_schedule(epochs)
    if method == "mie":  # one stage per modality, the epochs shared as evenly as they go
        k = len(modalities)
        return {"epoch_list": [epochs // k + (1 if i < epochs % k else 0) for i in range(k)]}
    if method == "di_mml":  # a quarter for the fusion head (stage 2), DUC from a third of stage 1
        stage2 = max(1, epochs // 4)
        stage1 = epochs - stage2
        settings = {"stage1_epochs": stage1, "stage2_epochs": stage2, "duc_start_epoch": stage1 // 3}
        if all(e.get("out_dim") == SMALL_FEATURES for e in encoders.values()):
            settings["tau"] = 1.0  # the paper's 50 is for 512-d ResNet features; 1 suits 64-d ones (quickstart)
        return settings
    return {}


def relearning_schedule(epochs: int) -> dict[str, Any]:
    """The release's every 20 of 90 epochs, 3 times, scaled to the budget. Its re-initialisation
    takes effect as the next epoch starts, so the last one must come before the last epoch; a
    budget too short for one (2 epochs) gets BalanceBenchmark's timing, which re-initialises as
    the epoch ends, rather than no re-initialisation at all (which would be joint training)."""
    every = max(1, round(epochs * 20 / 90))
    times = min(3, (epochs - 2) // every)
    if times == 0:
        return {"variant": "balancebenchmark", "reinit_epoch": 1, "reinit_num": 1}
    return {"reinit_epoch": every, "reinit_num": times}


def min_epochs(modalities: Sequence[str]) -> int:
    """The fewest epochs every method's stages fit in: MIE needs one per modality, DI-MML two."""
    return max(2, len(modalities))


def method_cells(names: Sequence[str], epochs: int, modalities: Sequence[str],
                 encoders: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Cell label -> dotted overrides: each method (joint first) and one unimodal cell per modality."""
    cells: dict[str, dict[str, Any]] = {}
    for name in sorted(names, key=lambda n: (n != "joint", n == "unimodal", n)):
        if name == "unimodal":
            cells.update({f"unimodal-{m}": {"method.name": "unimodal", "method.modality": m} for m in modalities})
        else:
            settings = epoch_settings(name, epochs, modalities, encoders)
            cells[name] = {"method.name": name, **{f"method.{k}": v for k, v in settings.items()}}
    return cells


# ---- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the sweep file says, and the measurements behind it."""

    info: CacheInfo
    group: str
    device: str
    encoders: dict[str, EncoderChoice]
    batch_size: int
    lr: float
    lr_test: RangeTest | None
    epochs: int
    fit: EpochFit | None
    costs: list[RunCost]
    cells: dict[str, dict[str, Any]]
    seeds: list[int]
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it is left out
    budget_minutes: float = 0.0

    def sweep_data(self, cells: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"group": self.group, "base": self.base(), "seeds": self.seeds,
                "cells": self.cells if cells is None else cells, "launcher": {"name": "inline"}}

    def base(self) -> dict[str, Any]:
        return {"dataset": dict(self.info.dataset),
                "model": {"encoders": {m: dict(c.section) for m, c in self.encoders.items()}, "fusion": "concat"},
                "optim": {**OPTIMISER, "lr": self.lr},
                "schedule": {"name": "constant"},
                "train": {"epochs": self.epochs, "batch_size": self.batch_size}}


def plan_sweep(cache: str | Path, *, budget_minutes: float, seeds: int = SEEDS, methods: Sequence[str] | None = None,
               lr: float | None = None, epochs: int | None = None, lr_steps: int = 200, group_prefix: str = "own",
               device: str = "auto") -> Plan:
    """Measure and decide everything a starter sweep of `cache` holds. `methods`: the registered
    methods to include (default: all); `lr` / `epochs` given skip the range test / the timing. The
    sweep's group is `<group_prefix>-<cache folder name>`."""
    datasets = DatasetCache()
    info = inspect_cache(cache, datasets)
    where = resolve_device(device)
    names = [m.name for m in info.modalities]
    chosen = choose_encoders(info.modalities, info.sizes["train"], where.type == "cuda")
    wanted = list(methods) if methods is not None else METHODS.names()
    # until the range test has spoken, the rate is a placeholder that only the test's configs see
    plan = Plan(info=info, group=f"{group_prefix}-{info.name}", device=str(where), encoders=chosen,
                batch_size=batch_size_for(info.sizes["train"]), lr=lr or PLACEHOLDER_LR, lr_test=None,
                epochs=epochs or min_epochs(names), fit=None, costs=[], cells={}, seeds=list(range(seeds)),
                budget_minutes=budget_minutes)
    plan.cells = buildable_cells(plan, wanted, datasets, device)
    if lr is None:
        (joint,) = run_configs(plan, {"joint": {"method.name": "joint"}}, device)
        plan.lr_test = range_test(joint, steps=lr_steps, datasets=datasets)
        plan.lr = float(f"{plan.lr_test.suggested:.2g}")
    if epochs is None:
        (joint,) = run_configs(plan, {"joint": {"method.name": "joint"}}, device)
        overhead = time_overhead(joint, datasets)
        plan.costs = [time_run(cfg, info.sizes, datasets, overhead) for cfg in run_configs(plan, device=device)]
        plan.fit = fit_epochs(plan.costs, seeds, budget_minutes * 60, min_epochs(names), MAX_EPOCHS)
        plan.epochs = plan.fit.epochs
        plan.cells = buildable_cells(plan, wanted, datasets, device)
    return plan


def run_configs(plan: Plan, cells: dict[str, dict[str, Any]] | None = None, device: str = "auto",
                seeds: Sequence[int] = (0,)) -> list[RunConfig]:
    """The plan's runs (or those of `cells`) as validated configs, with `device` for measuring here."""
    data = plan.sweep_data(cells)
    data["base"]["train"]["device"] = device
    return expand(SweepConfig.model_validate({**data, "seeds": list(seeds)}), origin="the starter sweep")


def buildable_cells(plan: Plan, wanted: Sequence[str], datasets: DatasetCache,
                    device: str) -> dict[str, dict[str, Any]]:
    """The cells of the `wanted` methods whose model can be built for this data at the plan's
    epochs; the others go to `plan.skipped` with the method's own reason."""
    encoders = {m: c.section for m, c in plan.encoders.items()}
    modalities = [m.name for m in plan.info.modalities]
    cells = method_cells([w for w in wanted if w not in plan.skipped], plan.epochs, modalities, encoders)
    kept = {}
    for label, cell in cells.items():
        try:
            (cfg,) = run_configs(plan, {label: cell}, device)
            build_checked(cfg, datasets)
        except ConfigError as e:
            plan.skipped[cell["method.name"]] = str(e).split("\n")[-1].strip()
            log.info("left out %s: %s", label, plan.skipped[cell["method.name"]])
            continue
        kept[label] = cell
    return kept


# ---- the file -----------------------------------------------------------------------------------


def flow(value: Any) -> str:
    """One line of YAML (flow style) for a mapping or list."""
    return yaml.safe_dump(json.loads(json.dumps(value)), default_flow_style=True, width=10**6, sort_keys=False).strip()


def render(plan: Plan, command: str, out: Path) -> str:
    """The sweep file `out`: the plan's data with comments that say why each value is what it is."""
    info, base = plan.info, plan.base()
    runs = len(plan.cells) * len(plan.seeds)
    lines = [f"# Starter sweep written by `{command}`: edit freely.",
             f"# Run it with `mmbalance sweep {out}`, then `mmbalance report results/{plan.group}`.",
             "#", "# Data: " + info.lines()[0], *["#" + line for line in info.lines()[1:]], "#",
             f"# Encoders (measured on {plan.device}). Rule: small encoders unless a GPU is here, the data has"
             f" at least",
             f"# {MANY_SAMPLES:,} training samples and an input's smaller side is at least {LARGE_SIDE} pixels;"
             " then ResNet18",
             "# (11M parameters: slow on a CPU, and it overfits smaller data). small_cnn for images, spectrograms and",
             f"# videos (wider from {MANY_SAMPLES:,} samples), mlp for vectors; one feature size for every encoder",
             "# (MLA's shared head and DI-MML compare features across modalities).",
             *[f"#   {m}: {c.why}" for m, c in plan.encoders.items()],
             f"# Batch {plan.batch_size}: {MAX_BATCH}, halved until an epoch has at least {MIN_STEPS} steps "
             f"({info.sizes['train']:,} training samples).",
             "#", *lr_lines(plan), "#", *epoch_lines(plan, runs), "#",
             "# Cells: every registered method that can be built for these modalities, with its stages fitted to the",
             f"# {plan.epochs} epochs, and a unimodal-only model per modality (the references of the probe deficit);",
             f"# {len(plan.seeds)} seeds each: {runs} runs.",
             *[f"#   left out {name}: {why}" for name, why in plan.skipped.items()],
             f"group: {plan.group}", "base:"]
    lines += [f"  {key}: {flow(value)}" for key, value in base.items() if key != "model"]
    lines += ["  model:", "    encoders:", *[f"      {m}: {flow(s)}" for m, s in base["model"]["encoders"].items()],
              f"    fusion: {base['model']['fusion']}"]
    lines += [f"seeds: {flow(plan.seeds)}", "cells:"]
    lines += [f"  {label}: {flow(cell)}" + cell_comment(label, cell) for label, cell in plan.cells.items()]
    lines += ["launcher: {name: inline}   # one run after another here; the epoch budget assumes so"]
    return "\n".join(lines) + "\n"


def lr_lines(plan: Plan) -> list[str]:
    if plan.lr_test is None:
        return [f"# Learning rate {plan.lr:g}: given on the command line (no range test). SGD with momentum 0.9 and",
                "# weight decay 1e-4 (the reference repos'), constant: every method and stage sees this rate."]
    t = plan.lr_test
    return [f"# Learning rate {plan.lr:g}: a range test of the joint model on the training split: {t.describe()}.",
            f"# The rate is the lower of a tenth of the rate at the smoothed minimum ({t.lr_at_minimum / 10:.3g};"
            " there the",
            f"# loss is about to blow up) and the rate of steepest descent ({t.steepest:.3g}),"
            " fastai's lr_find readings.",
            "# SGD with momentum 0.9 and weight decay 1e-4 (the reference repos'), constant: every method and stage",
            "# sees this rate."]


def epoch_lines(plan: Plan, runs: int) -> list[str]:
    if plan.fit is None:
        return [f"# Epochs {plan.epochs}: given on the command line (no timing)."]
    lines = [f"# Epochs {plan.epochs}: the most that fit the {plan.budget_minutes:g}-minute budget for all"
             f" {runs} runs one "
             f"after another ({plan.fit.describe()}),",
             f"# between {min_epochs([m.name for m in plan.info.modalities])} (the staged methods' minimum) and "
             f"{MAX_EPOCHS}. Timed here on a few batches: per run, epochs x (training + evaluating val and test +",
             "# checkpoints and records) + the probes + start-up:"]
    lines += [f"#   {c.label}: {c.train_samples_per_s:,.0f} training samples/s, {c.epoch_s:.1f} s/epoch"
              for c in plan.costs]
    if not plan.fit.fits:
        lines.append(f"# WARNING: even {plan.epochs} epochs exceed the budget: allow more minutes,"
                     " or fewer seeds or cells.")
    return lines


def cell_comment(label: str, cell: dict[str, Any]) -> str:
    if cell["method.name"] == "unimodal":
        return f"   # {cell['method.modality']} alone"
    staged = [k.removeprefix("method.") for k in cell if k != "method.name"]
    return f"   # fitted to the epochs: {', '.join(staged)}" if staged else ""


def write_plan(plan: Plan, out: str | Path, command: str, *, force: bool = False) -> Path:
    """Write the sweep file, then read it back as `mmbalance sweep` will (a check, not a formality:
    every run's config is validated)."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{str(out)!r} exists; choose another --out or pass --force to overwrite it")
    atomic_write_text(out, render(plan, command, out))
    load_sweep(out)
    return out


def summary(plan: Plan, out: Path) -> str:
    """The lines `mmbalance init` prints."""
    lines = [f"wrote {out}: {len(plan.cells)} cells x {len(plan.seeds)} seeds, {plan.epochs} epochs, lr {plan.lr:g}, "
             f"batch {plan.batch_size}",
             *[f"  {m}: {c.section['name']} ({c.why})" for m, c in plan.encoders.items()]]
    if plan.fit is not None:
        lines.append(f"  {plan.fit.describe()}")
    lines += [f"  left out {name}: {why}" for name, why in plan.skipped.items()]
    lines.append(f"run it: mmbalance sweep {out}")
    return "\n".join(lines)

