"""Live tracking: each epoch's record (metrics.jsonl's line) sent to TensorBoard and, when asked and
installed, to Weights & Biases or MLflow, so that a sweep can be watched while it trains
(`tensorboard --logdir results/GROUP`).

A tracker is one small protocol, `log_epoch(epoch, record)` and `close()`. What it logs is the record's
numeric leaves, one scalar each, named by their path in the record (`train/loss`, `val/acc`,
`val/modality_acc/audio`, `lr`, `method/<diagnostic>`): the training step's losses and diagnostics
averaged over the epoch, validation and test metrics with each modality's accuracy, the learning rate,
and the method's `epoch_log()` and evaluation logs. `epoch` itself and booleans (`selectable`) are not
scalars to plot.

Resume: a tracker is opened with the run's history as its checkpoint holds it (what Trainer.resume
leaves in metrics.jsonl) and logs it again before training continues. TensorBoard's writer starts with
`purge_step=0`, so that a reader drops the events of the earlier process (epochs retrained since their
checkpoint included) and shows each epoch once; W&B and MLflow start a new run per process holding the
whole history.

TensorBoard events go to `<run dir>/tb/<label>,seed=<seed>/`: TensorBoard names a run by its directory
below --logdir, so a sweep's runs read `<run id>/tb/ogm-ge,fusion=sum,seed=0`. The trackers' packages
are imported only when one is opened (the `status` and `list` commands stay light).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from mmbalance.bench.config import RunConfig
from mmbalance.bench.store import RunDir
from mmbalance.core.errors import ConfigError

TB_DIR = "tb"


class Tracker(Protocol):
    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The record's numeric leaves as (tag, value), the tag being the leaf's path joined by '/'."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and tag != "epoch":
            yield tag, float(value)


def run_name(cfg: RunConfig) -> str:
    """A run's readable name: its label (a sweep's cell and grid values) and seed, in one path part."""
    label = (cfg.label or cfg.method["name"]).replace("/", ",")
    return f"{label},seed={cfg.train.seed}"


def asked(cfg: RunConfig) -> list[str]:
    """The trackers `cfg.train` asks for, by package name."""
    return (["tensorboard"] if cfg.train.tensorboard else []) + list(cfg.train.tracking)


def require(module: str) -> Any:
    """The tracker package `module`, imported now; where it is not installed, a one-line ConfigError
    naming the key that asked for it and what to do instead."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        key, instead = (("train.tensorboard is true", "set train.tensorboard=false") if module == "tensorboard"
                        else (f"train.tracking lists {module}", "remove it from train.tracking"))
        raise ConfigError(f"{key}, but {module} is not installed here ({e}); install it "
                          f"(pip install {module}) or {instead}") from None


def check_trackers(configs: Sequence[RunConfig]) -> None:
    """Import the packages of the trackers `configs` ask for, so that a missing one stops a sweep
    before any run starts (bench.sweep.check_runs) rather than failing each run in turn."""
    for module in dict.fromkeys(m for cfg in configs for m in asked(cfg)):
        require(module)


class TensorBoardTracker:
    """Scalars in TensorBoard event files, one step per epoch, flushed after each epoch so that a
    live TensorBoard sees it and a crash loses nothing."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir.path / TB_DIR / run_name(cfg)), purge_step=0)
        # a run that fails closes no tracker: its writer's thread and file go with the tracker
        self._closer = weakref.finalize(self, self.writer.close)

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record):
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self._closer()


class WandbTracker:
    """A W&B run per process: project = the run's group, name = label and seed, config = the run's."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir) -> None:
        wandb = require("wandb")
        self.run = wandb.init(project=cfg.group, group=cfg.label or cfg.method["name"], name=run_name(cfg),
                              config=cfg.to_dict(), tags=[run_dir.run_id], dir=str(run_dir.path))

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        self.run.log({**dict(scalars(record)), "epoch": epoch}, step=epoch)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run per process (in MLflow's configured tracking store), named by label and seed,
    tagged with the run id and group."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir) -> None:
        self.mlflow = require("mlflow")
        self.run = self.mlflow.start_run(run_name=run_name(cfg),
                                         tags={"run_id": run_dir.run_id, "group": cfg.group})

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(dict(scalars(record)), step=epoch, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers as one: each epoch goes to every one of them."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(epoch, record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(cfg: RunConfig, run_dir: RunDir, history: Sequence[Mapping[str, Any]]) -> Trackers:
    """The trackers `cfg.train` asks for (none: an empty Trackers), each given `history` (the epochs
    already trained, as the checkpoint restored them) before training goes on."""
    trackers = Trackers([TRACKERS[name](cfg, run_dir) for name in asked(cfg)])
    for record in history:
        trackers.log_epoch(record["epoch"], record)
    return trackers
