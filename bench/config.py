"""Typed, validated run configs: YAML + dotted overrides -> RunConfig -> run id.

A config has the sections dataset / model / method / optim / schedule / train / eval. The
`dataset`, `method` and every encoder section are *named*: a `name` picks a registered class and
the other keys are validated against that class's own `Params` model, so a method's
hyperparameters are typed without the harness knowing them.

Every error names the dotted key, where its value came from (file or override) and what is
allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from mmbalance.bench.threads import is_thread_setting
from mmbalance.bench.trial import TrialLink
from mmbalance.core.errors import ConfigError, allowed_list, closest
from mmbalance.core.overrides import Sources, apply_overrides, deep_merge, format_errors, read_yaml
from mmbalance.core.params import Strict


class ModelConfig(Strict):
    # modality -> {name: <encoder>, ...its params}; modalities left out get the dataset's default
    encoders: dict[str, dict[str, Any]] = Field(default_factory=dict)
    fusion: Literal["concat", "sum", "film", "gated", "late"] = "concat"
    # film/gated: the modality whose features condition (modulate) the other's
    conditioning: str | None = None


# Defaults are the reference repos' (OGM-GE, MLA, DI-MML stage 1): SGD 1e-3, momentum 0.9,
# weight decay 1e-4, StepLR(70, 0.1) stepped per epoch, 100 epochs, batch 64.


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "multistep", "cosine"] = "step"
    step_size: int = Field(70, ge=1)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)


class TrainConfig(Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    drop_last: bool = False
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    amp: bool = True  # bf16 autocast, used only on CUDA
    # loader processes, persistent across epochs; None: the CPU share of this process on CUDA (at
    # most 8), none on CPU, where the model needs the cores and cached reads are cheap
    workers: int | None = Field(None, ge=0)
    prefetch: int = Field(4, ge=1)  # batches each loader worker reads ahead
    # where per-pixel augmentation (crops, flips, noise, normalisation) runs: per sample in the
    # loader, or per batch on the training device; auto = device on CUDA and on a CPU without loader
    # workers (bench.data.augment_on_device), loader otherwise
    augment: Literal["auto", "loader", "device"] = "auto"
    channels_last: bool = True  # CUDA only: NHWC model and image batches
    cudnn_benchmark: bool = True  # CUDA only: autotune convolutions (shapes are fixed per run)
    compile: bool = False  # torch.compile the encoders (first epoch pays the compilation)
    progress: bool = True
    # torch's intra-op threads: a number, or auto (bench.threads: 1 per run on CPU, the process's
    # share of the cores, at most 8, on an accelerator)
    threads: int | Literal["auto"] = "auto"
    # when checkpoint.pt (and best.pt) are written: every N epochs, "<S>s" once S seconds have
    # passed since the last write, or auto (bench.train.CheckpointSchedule: while writing takes
    # at most 5% of the run); always after the last epoch. A resume retrains from the last one.
    checkpoint_every: int | str = "auto"
    # live tracking (bench.tracking): TensorBoard event files in <run dir>/tb/, each epoch's record as
    # scalars; false for a single run, true unless a sweep says otherwise (bench.sweep.expand)
    tensorboard: bool = False
    # further trackers through the same interface, each imported only when listed (not installed: an error)
    tracking: list[Literal["wandb", "mlflow"]] = Field(default_factory=list)

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value: object) -> object:
        if is_thread_setting(value):
            return value
        raise PydanticCustomError("threads", "must be a whole number >= 1 or 'auto'")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _checkpoint_every(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and checkpoint_seconds(value) is not None:
            return value.strip()
        raise PydanticCustomError("checkpoint_every", "must be a number of epochs >= 1, seconds such as '300s' "
                                  "(> 0), or 'auto'")


class EvalConfig(Strict):
    select_metric: Literal["acc", "macro_f1", "map"] = "acc"
    probe: bool = True
    probe_c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    probe_max_iter: int = Field(500, ge=10)
    # at the end of the run, best.pt on the test split with each modality zeroed and noised
    # (bench.robustness -> robustness.json); an evaluation of the finished weights, not part of them
    robustness: bool = False
    # modality contributions (bench.contribution) on val each epoch and on test at the selected one;
    # a record of the run, not part of what it trains: out of the run id. Off by default: 2^M more
    # evaluation passes over val cost the quickstart's joint-concat ~14% CPU time per epoch
    contribution: bool = False
    # how a modality is absent from a coalition (Method.predict_masked): its features zeroed where the
    # method fuses them, or its input zeroed and still encoded (BalanceBenchmark's Calculate_Shapley)
    contribution_mask: Literal["features", "input"] = "features"


class RunConfig(Strict):
    group: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    label: str | None = None  # the row name in reports (a sweep's cell name)
    dataset: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_NAMES["dataset"]})
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_NAMES["method"]})
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # set by `mmbalance tune` on its trial runs (bench.trial): report val to this study's trial
    # after each epoch, stop when it is pruned; how the run is watched, not what it trains
    trial: TrialLink | None = None

    def run_id(self) -> str:
        return run_id(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


DEFAULT_NAMES = {"dataset": "avdigits", "method": "joint"}

# Keys that say how a run executes, not what it computes, so they stay out of the run id:
# changing them keeps a run's directory and results.
HASH_EXCLUDED = ("group", "label", "train.workers", "train.progress", "train.prefetch", "train.channels_last",
                 "train.cudnn_benchmark", "train.compile", "train.threads", "train.checkpoint_every",
                 "train.tensorboard", "train.tracking", "eval.robustness", "eval.contribution",
                 "eval.contribution_mask", "trial")


def checkpoint_seconds(every: str) -> float | None:
    """The seconds of a `train.checkpoint_every` such as '300s' or '1.5s'; None if it is not one."""
    text = every.strip()
    if not text.endswith("s"):
        return None
    try:
        seconds = float(text[:-1])
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def run_id(cfg: RunConfig) -> str:
    """`<method>-<12 hex>`: a stable hash of the resolved config (defaults filled in)."""
    data = cfg.to_dict()
    for dotted in HASH_EXCLUDED:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return f"{cfg.method['name']}-{digest[:12]}"


# ----------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read YAML (optional), merge `base` under it and dotted `overrides` over it, then validate."""
    sources = Sources()
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))
    sources.record(data, "the sweep's base config")
    if path is not None:
        file_data = read_yaml(Path(path))
        sources.record(file_data, f"file {str(path)!r}")
        deep_merge(data, file_data)
    apply_overrides(data, sources, overrides)
    return validate(data, sources)


def validate(data: Mapping[str, Any], sources: Sources | None = None) -> RunConfig:
    """Structure first, then each named section against its registered class's Params."""
    sources = sources or Sources()
    data = dict(data)
    for section, default in DEFAULT_NAMES.items():
        # `dataset.cache=...` alone keeps the default dataset rather than dropping its name
        if isinstance(data.get(section), Mapping) and "name" not in data[section]:
            data[section] = {"name": default, **data[section]}
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, RunConfig, sources)) from None
    from mmbalance.core.registry import DATASETS, ENCODERS, METHODS

    dataset_cls = DATASETS.get(require_name(cfg.dataset, "dataset", sources), sources.of("dataset.name"))
    cfg.dataset = resolve_named(cfg.dataset, dataset_cls.Params, "dataset", sources)
    cfg.method = resolve_named(
        cfg.method,
        METHODS.get(require_name(cfg.method, "method", sources), sources.of("method.name")).Params,
        "method",
        sources,
    )
    dataset_params = dataset_cls.resolve_params(DATASETS.params_of(cfg.dataset), sources.of)
    cfg.dataset = {"name": cfg.dataset["name"], **dataset_params.model_dump(mode="json")}
    modalities = dataset_cls.modality_names(dataset_params)
    encoders = dict(cfg.model.encoders)
    for modality in encoders:
        if modality not in modalities:
            raise ConfigError(
                f"model.encoders.{modality} (from {sources.of(f'model.encoders.{modality}')}): "
                f"dataset {dataset_cls.registry_name!r} has no modality {modality!r}"
                f"{closest(modality, modalities)}; its modalities: {allowed_list(modalities)}"
            )
    for modality in modalities:
        where = f"model.encoders.{modality}"
        section = {**dataset_cls.default_encoder(modality, dataset_params), **encoders.get(modality, {})}
        encoder_cls = ENCODERS.get(require_name(section, where, sources), sources.of(where + ".name"))
        encoders[modality] = resolve_named(section, encoder_cls.Params, where, sources)
    cfg.model.encoders = encoders
    conditioning = cfg.model.conditioning
    if conditioning is not None and conditioning not in modalities:
        raise ConfigError(
            f"model.conditioning={conditioning!r} (from {sources.of('model.conditioning')}) is not a "
            f"modality of {dataset_cls.registry_name!r}{closest(conditioning, modalities)}; "
            f"allowed: {allowed_list(modalities)}"
        )
    return cfg


def require_name(section: Mapping[str, Any], where: str, sources: Sources) -> str:
    name = section.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name is missing (section from {sources.of(where)}); it picks the class")
    return name


def resolve_named(
    section: Mapping[str, Any], params_cls: type[BaseModel], where: str, sources: Sources
) -> dict[str, Any]:
    """Validate a named section's keys against `params_cls`; return it with defaults filled in."""
    rest = {k: v for k, v in section.items() if k != "name"}
    try:
        params = params_cls.model_validate(rest)
    except ValidationError as e:
        raise ConfigError(format_errors(e, params_cls, sources, prefix=where)) from None
    return {"name": section["name"], **params.model_dump(mode="json")}


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
