"""Runs that need other runs trained first (Method.requires: UMT's teachers, UME's members).

A method names each requirement as overrides of its own run's config (methods/base.py). Here they
become run configs in the same group (the same results folder, so a sweep's own unimodal cells
are found by run id and trained once); `with_requirements` adds the missing ones to a list of runs,
each before the first run that needs it, which is the order every launcher keeps (local and
SLURM also wait for them). At build time `requirement_builders` hands the method its
requirements' trained models from the store, or, for a check that trains nothing, untrained
stand-ins of the same configs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from mmbalance.bench.config import RunConfig, validate
from mmbalance.bench.store import RunDir
from mmbalance.core.errors import ConfigError, MMBalanceError
from mmbalance.core.overrides import Sources, assign
from mmbalance.core.registry import DATASETS, METHODS

if TYPE_CHECKING:  # planning (which `status` and the launchers import) needs no torch
    from mmbalance.methods.base import Method

# builds the method of a run config (its own requirements as stand-ins): what a requirement is loaded into
MethodBuilder = Callable[[RunConfig], "Method"]


class RequirementNotFinished(MMBalanceError):
    """A run's requirement has not finished in the store (not started, failed, still running)."""


def run_name(cfg: RunConfig) -> str:
    return cfg.label or cfg.method["name"]


def required_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """Requirement name -> the required run's config: this run's config with the method's
    overrides applied, labelled `<this run's label>:<name>` (a row of its own in reports)."""
    cls = METHODS.get(cfg.method["name"], "method.name")
    dataset_cls = DATASETS.get(cfg.dataset["name"], "dataset.name")
    modalities = dataset_cls.modality_names(DATASETS.params_of(cfg.dataset, "dataset.name"))
    found = {}
    for name, overrides in cls.requires(METHODS.params_of(cfg.method, "method.name"), modalities).items():
        data, sources = cfg.to_dict(), Sources()
        sources.record(data, f"the config of run {run_name(cfg)!r}")
        for dotted, value in overrides.items():
            assign(data, sources, dotted, copy.deepcopy(value),
                   f"requirement {name!r} of method {cfg.method['name']!r}")
        data["label"] = f"{run_name(cfg)}:{name}"
        data["trial"] = None  # a tuning trial's teachers are not the trial: only the trial reports to its study
        try:
            found[name] = validate(data, sources)
        except ConfigError as e:
            raise ConfigError(f"run {run_name(cfg)!r} seed {cfg.train.seed}: its requirement {name!r}: {e}") from None
    return found


def with_requirements(configs: Sequence[RunConfig]) -> list[RunConfig]:
    """`configs` and every run they need (transitively), each run once (by run id: a sweep's own
    cell stands for a requirement with its config) and after the runs it needs; otherwise in the
    given order."""
    given = {cfg.run_id(): cfg for cfg in configs}
    ordered: dict[str, RunConfig] = {}

    def visit(cfg: RunConfig, chain: tuple[str, ...]) -> None:
        rid = cfg.run_id()
        if rid in ordered:
            return
        if rid in chain:
            raise ConfigError(f"run {run_name(cfg)!r} ({rid}) requires itself through {' -> '.join(chain)}")
        for required in required_configs(cfg).values():
            visit(given.get(required.run_id(), required), (*chain, rid))
        ordered[rid] = cfg

    for cfg in configs:
        visit(cfg, ())
    return list(ordered.values())


def needs(cfg: RunConfig) -> dict[str, str]:
    """Requirement name -> the required run's id."""
    return {name: required.run_id() for name, required in required_configs(cfg).items()}


def requirement_builders(cfg: RunConfig, build: MethodBuilder,
                         run_dir: RunDir | None = None) -> dict[str, Callable[[], Method]]:
    """MethodSetup.required for `cfg`: with `run_dir` (this run's directory), each requirement's
    trained method, loaded from its finished run beside it (best.pt, frozen, eval mode); without,
    an untrained stand-in of the same config (checks that train nothing)."""
    return {name: partial(load_required, name, required, build,
                          None if run_dir is None else RunDir(run_dir.path.parent / required.run_id()), cfg)
            for name, required in required_configs(cfg).items()}


def load_required(name: str, cfg: RunConfig, build: MethodBuilder, run_dir: RunDir | None,
                  needed_by: RunConfig) -> Method:
    import torch

    if run_dir is not None:
        check_finished(name, cfg, run_dir, needed_by)
    with torch.random.fork_rng(devices=[]):  # building it leaves the needing run's random stream as it was
        method = build(cfg)
    if run_dir is not None:
        method.load_state_dict(run_dir.load(run_dir.best)["model"])
    method.requires_grad_(False)
    return method.eval()


def check_finished(name: str, cfg: RunConfig, run_dir: RunDir, needed_by: RunConfig) -> None:
    """RequirementNotFinished, in one line naming the required config, its run directory and its state."""
    if run_dir.done():
        return
    state = run_dir.recorded_status()["state"]
    state = "not started (no run there)" if state == "new" else state
    method = ", ".join(f"{k}: {v}" for k, v in cfg.method.items())
    raise RequirementNotFinished(
        f"run {run_name(needed_by)!r} (method {needed_by.method['name']!r}) needs its requirement {name!r} trained "
        f"first: run {cfg.run_id()} (method {{{method}}}, otherwise this run's config) at {Path(run_dir.path)} is "
        f"{state}; launch the sweep with this run (`mmbalance sweep` plans and trains its requirements first)")
