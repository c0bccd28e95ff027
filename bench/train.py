"""The one training loop that every method shares.

It owns threads, seeding, devices, autocast, batching, per-epoch evaluation on val and test, model
selection on val, checkpoints (CheckpointSchedule) with exact resume, metrics.jsonl, probes, cost and
the run's status. The method owns only what happens inside one step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import resource
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mmbalance.bench.cancel import RunCancelled
from mmbalance.bench.claim import elsewhere_line, try_claim
from mmbalance.bench.config import RunConfig, checkpoint_seconds
from mmbalance.bench.contribution import contribution
from mmbalance.bench.data import build_loaders, epoch_generator, seed_everything
from mmbalance.bench.device import prepare_model, resolve_device
from mmbalance.bench.evaluate import Evaluation, evaluate
from mmbalance.bench.oserror import os_message
from mmbalance.bench.probe import probe_all
from mmbalance.bench.requirements import requirement_builders
from mmbalance.bench.robustness import evaluate_trained
from mmbalance.bench.schema import check_checkpoint
from mmbalance.bench.selection import best_epoch
from mmbalance.bench.store import RunDir, Store
from mmbalance.bench.threads import apply_threads
from mmbalance.bench.tracking import open_trackers
from mmbalance.core.errors import ConfigError, DamagedFile, MMBalanceError, RunFailed
from mmbalance.core.registry import DATASETS, METHODS
from mmbalance.core.types import Batch
from mmbalance.datasets.base import Dataset
from mmbalance.methods.base import Method, MethodSetup, StepContext, no_holdout
from mmbalance.models import build_encoder
from mmbalance.models.stages import entry_module

log = logging.getLogger(__name__)

# builds (or hands out an already built) dataset for a config; sweeps share one between runs
DatasetSource = Callable[[RunConfig], Dataset]


# called after each epoch with (epoch, that epoch's metrics record): a tuning study's pruner
EpochCallback = Callable[[int, dict[str, Any]], None]


class RunPruned(MMBalanceError):
    """Raised by an epoch callback to end its run early, for good: a tuning trial its study pruned
    (bench.trial). The run is recorded `pruned` with this message and writes no summary; `run`
    returns it in that state (launchers neither resume nor retry it)."""


class NonFiniteLoss(MMBalanceError):
    def __init__(self, key: str, value: float, epoch: int, batch: int) -> None:
        super().__init__(f"loss {key!r} became {value} at epoch {epoch}, batch {batch}")
        self.epoch, self.batch = epoch, batch


@dataclass
class RunResult:
    run_id: str
    path: str
    state: str  # finished | skipped | pruned (a tuning trial) | elsewhere (another process holds its claim)
    summary: dict[str, Any]
    note: str = ""  # for `elsewhere`: who holds it, in one line


def build_dataset(cfg: RunConfig) -> Dataset:
    return DATASETS.create(cfg.dataset, where="dataset.name")


def build_method(cfg: RunConfig, dataset: Dataset,
                 required: dict[str, Callable[[], Method]] | None = None) -> Method:
    """The run's method on fresh encoders; `required`: its requirements' builders (MethodSetup.required)."""
    encoders = nn.ModuleDict({m.name: build_encoder(cfg.model.encoders[m.name], m) for m in dataset.modalities})
    setup = MethodSetup(encoders, dataset.num_classes, dataset.modalities, cfg.model.fusion,
                        cfg.model.conditioning, cfg.train.epochs, required or {})
    return METHODS.create(cfg.method, setup, where="method.name")


def build_checked(cfg: RunConfig, datasets: DatasetSource) -> Method:
    """The run's method with untrained stand-ins for its requirements: what a check that trains
    nothing builds, and what a requirement's trained weights are loaded into."""
    return build_method(cfg, datasets(cfg), requirement_builders(cfg, partial(build_checked, datasets=datasets)))


def inner_encoders(method: Method) -> list[nn.ModuleDict]:
    """The encoders of the methods inside `method` (UMT's teachers: required runs, or trained in-run)."""
    return [sub.encoders for sub in method.modules() if isinstance(sub, Method) and sub is not method]


def holdout_of(method: Method) -> float:
    """The method's `holdout_fraction()`, checked: a share of train in [0, 1)."""
    fraction = float(method.holdout_fraction())
    if not 0 <= fraction < 1:
        raise ConfigError(f"method {method.registry_name!r} holds out {fraction} of the training split; "
                          "Method.holdout_fraction() must be in [0, 1)")
    return fraction


def epoch_items_of(method: Method, epoch: int, rows: int) -> list[int] | None:
    """The method's `epoch_items(epoch)`, checked: rows of its `rows`-row training split."""
    items = method.epoch_items(epoch)
    if items is None:
        return None
    items = [int(i) for i in items]
    bad = [i for i in items if not 0 <= i < rows]
    if bad or not items:
        what = f"row {bad[0]}" if bad else "no rows"
        raise RunFailed(f"method {method.registry_name!r} chose {what} for epoch {epoch}; Method.epoch_items "
                        f"returns rows of its training split, 0 to {rows - 1}, at least one")
    return items


def build_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, s.step_size, s.gamma)
    if s.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, s.milestones, s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


PROGRESS_EVERY = 25  # steps between progress-bar loss updates (each one waits for the device)


class LossTally:
    """Sums a step's losses over an epoch without waiting for the device. With `lazy` (an
    accelerator), tensors are summed where they are, with the first non-finite value of each key
    and its batch index, and `means()` syncs once at the end; numbers (and, on CPU, where reading
    is free, tensors) are summed here. `check()` raises NonFiniteLoss for the first bad batch."""

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy  # keep tensors where they are (on an accelerator, reading one waits for it)
        self.sums: dict[str, torch.Tensor | float] = {}
        self.first_bad: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (batch index, value)
        self.samples = 0
        self.bad_host: tuple[str, float, int] | None = None

    def add(self, losses: dict[str, Any], n: int, index: int) -> None:
        self.samples += n
        for key, value in losses.items():
            if isinstance(value, torch.Tensor) and self.lazy:
                value = value.detach().float()
                self.sums[key] = self.sums.get(key, 0.0) + value * n
                where, what = self.first_bad.get(key) or (torch.full((), -1, device=value.device),
                                                          torch.zeros((), device=value.device))
                newly = (where < 0) & ~torch.isfinite(value)
                self.first_bad[key] = (torch.where(newly, index, where), torch.where(newly, value, what))
            else:
                value = float(value)
                self.sums[key] = self.sums.get(key, 0.0) + value * n
                if not math.isfinite(value) and self.bad_host is None:
                    self.bad_host = (key, value, index)

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.samples, 1) for k, v in self.sums.items()}

    def check(self, epoch: int) -> None:
        bad = [(int(where), key, float(what)) for key, (where, what) in self.first_bad.items() if int(where) >= 0]
        if self.bad_host is not None:
            key, value, index = self.bad_host
            bad.append((index, key, value))
        if bad:
            index, key, value = min(bad)
            raise NonFiniteLoss(key, value, epoch, index)


class PassCounter:
    """Counts encoder forward calls, to report forward passes per step: every call inside a training
    step (`with counter.step()`), in whatever mode (a method's eval-mode or no-grad passes cost a
    step as much: AGM's masked passes, DI-MML's frozen stage-2 encoders), and training-mode calls
    outside one."""

    def __init__(self, encoders: nn.ModuleDict, *inner: nn.ModuleDict) -> None:
        """`inner`: encoders of models a method runs in its steps (its required runs'): their
        calls count too, in units of one pass of `encoders`."""
        self.calls = 0
        self.n_encoders = len(encoders)
        self.in_step = False
        hooked = {id(e): e for group in (encoders, *inner) for e in group.values()}  # each module once
        for encoder in hooked.values():
            # on its first block where it has stages: a method may run them without calling it (Greedy)
            entry_module(encoder).register_forward_hook(partial(self._hook, encoder))

    @contextmanager
    def step(self) -> Iterator[None]:
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False

    def _hook(self, encoder: nn.Module, module: nn.Module, args: Any, output: Any) -> None:
        if encoder.training or self.in_step:
            self.calls += 1


# checkpoint_every=auto: writing checkpoints takes about this share of a run's time. Measured on
# CPU (README, "Checkpoints"; bench/perf/checkpoint_cost.py): a checkpoint after every epoch took
# 9.8% of a 10-epoch run of the ResNet18 pair and 12.3% of the quickstart's 40 epochs; auto, 6.1%
# (its compulsory first and last writes weigh in 10 epochs) and 4.4%. Shorter (GPU) epochs write
# less often.
CHECKPOINT_SHARE = 0.05


class CheckpointSchedule:
    """When the trainer writes checkpoint.pt (with best.pt): after the epochs `train.checkpoint_every`
    names, and always after the last one.

    - N (epochs): after epochs N-1, 2N-1, ... (counted from 0);
    - "<S>s": once S seconds have passed since the last write (or since training started in this
      process);
    - auto: once the time since the last write is at least (1 - share) / share times what that
      write took, so that writing takes about CHECKPOINT_SHARE of the time between the first
      write (after the first epoch, which measures the write) and the last.

    Which epochs are written never changes what a run computes: a resume retrains from the last
    one (Trainer.resume), so a crash costs at most the epochs since."""

    def __init__(self, every: int | str, epochs: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.epochs, self.clock = every, epochs, clock
        self.seconds = checkpoint_seconds(every) if isinstance(every, str) and every != "auto" else None
        self.since = clock()  # when the last write ended (or training started here)
        self.last_s = 0.0  # what the last write took
        self.writes, self.write_s = 0, 0.0  # this process's writes and their seconds (the run's cost)

    def due(self, epoch: int) -> bool:
        if epoch == self.epochs - 1:
            return True
        if isinstance(self.every, int):
            return (epoch + 1) % self.every == 0
        elapsed = self.clock() - self.since
        if self.seconds is not None:
            return elapsed >= self.seconds
        return elapsed * CHECKPOINT_SHARE >= self.last_s * (1 - CHECKPOINT_SHARE)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Time one write (the block)."""
        start = self.clock()
        yield
        self.since = self.clock()
        self.last_s = self.since - start
        self.writes += 1
        self.write_s += self.last_s


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a state dict that later training steps do not change (on the model's device:
    a copy there is cheap; it is serialised only when a checkpoint is written)."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


class Trainer:
    """Trains one run config into one run directory."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, datasets: DatasetSource = build_dataset,
                 stand_ins: bool = False) -> None:
        """`stand_ins`: untrained stand-ins for the method's requirements (a timing that trains
        nothing for the record), not their finished runs from the store."""
        self.cfg = cfg
        self.dir = run_dir
        self.device = resolve_device(cfg.train.device)
        self.threads, self.threads_why = apply_threads(cfg.train.threads, self.device.type)
        seed_everything(cfg.train.seed)
        self.dataset = datasets(cfg)
        trained = requirement_builders(cfg, partial(build_checked, datasets=datasets), None if stand_ins else run_dir)
        self.method = build_method(cfg, self.dataset, trained)  # before the loaders: its holdout_fraction()
        self.loaders = build_loaders(self.dataset, cfg.train, self.device, holdout_of(self.method))
        prepare_model(self.method, self.method.encoders, cfg.train, self.device)
        self.context = StepContext(self.build_optimizer, self.train_pass, self.device, cfg.train.amp,
                                   val_batches=self.loaders["val"],
                                   holdout_batches=self.loaders["holdout"] if "holdout" in self.loaders else no_holdout,
                                   seed=cfg.train.seed)
        self.method.attach(self.context)
        self.passes = PassCounter(self.method.encoders, *inner_encoders(self.method))
        self.steps = 0
        self.schedule = CheckpointSchedule(cfg.train.checkpoint_every, cfg.train.epochs)
        # the best-val epoch's weights since the last checkpoint, written with the next one
        self.new_best: dict[str, Any] | None = None

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(self.cfg, self.method.param_groups())
        return optimizer, build_scheduler(self.cfg, optimizer)

    def train_pass(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """The method's training rows: in order at the evaluation batch size, or shuffled by
        `generator` at the training batch size (an epoch's batches)."""
        if generator is not None:
            return self.loaders["train"](generator)
        return self.loaders["train"](batch_size=self.cfg.train.eval_batch_size)

    # ---- checkpoints
    def save_checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """checkpoint.pt after `epoch`, with best.pt when a better epoch came since the last one.
        The new best goes to best.pt.next first and over best.pt only once checkpoint.pt is
        written, so that best.pt always holds the epoch the last checkpoint's history selects
        (or best.pt.next does, when a crash came between the two renames: see settle_best)."""
        if self.new_best is not None:
            self.dir.save(self.dir.best_next, self.new_best)
        self.dir.save(
            self.dir.checkpoint,
            {
                "epoch": epoch,
                "model": self.method.state_dict(),
                "optimizer": self.context.optimizer.state_dict(),
                "scheduler": self.context.scheduler.state_dict(),
                "rng": rng_state(),
                "counters": {"steps": self.steps, "forward": self.passes.calls,
                             "backward": self.context.backward_passes},
                # small; a resume rewrites metrics.jsonl from it, so a damaged one costs nothing
                "history": history,
            },
        )
        if self.new_best is not None:
            os.replace(self.dir.best_next, self.dir.best)
            self.new_best = None

    def resume(self) -> int:
        """Restore the last checkpoint if there is a usable one; returns the first epoch still to train."""
        state = self.restorable()
        if state is None:
            self.dir.write_metrics([])
            return 0
        self.method.load_state_dict(state["model"])
        self.context.optimizer.load_state_dict(state["optimizer"])
        self.context.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        counters = state["counters"]
        self.steps, self.passes.calls = counters["steps"], counters["forward"]
        self.context.backward_passes = counters["backward"]
        # epochs recorded after the checkpoint are retrained, so their lines go (and a damaged
        # metrics.jsonl is replaced)
        self.dir.write_metrics(state["history"])
        return state["epoch"] + 1

    def restorable(self) -> dict[str, Any] | None:
        """checkpoint.pt with its metrics history, or None: there is none, or it or best.pt is
        damaged (best.pt: unreadable, or not the epoch the checkpoint's history selects). A
        damaged one is kept aside (listed in status.json), the other one removed, and the run
        starts again from scratch."""
        if not self.dir.checkpoint.exists():
            self.dir.best_next.unlink(missing_ok=True)  # a best written before any checkpoint
            return None
        epochs = self.cfg.train.epochs
        try:
            state = check_checkpoint(self.dir.load(self.dir.checkpoint), self.dir.checkpoint, epochs)
            if state.get("history") is None:  # written before checkpoints held the history
                state["history"] = self.dir.read_metrics()[: state["epoch"] + 1]
                if len(state["history"]) != state["epoch"] + 1:
                    raise DamagedFile(self.dir.checkpoint, f"holds no metrics history, and metrics.jsonl has "
                                      f"{len(state['history'])} of its {state['epoch'] + 1} epochs")
            self.settle_best(best_epoch(state["history"], self.cfg.eval.select_metric))
        except DamagedFile as e:
            self.dir.record_damage(self.dir.set_aside(e))
            for stale in (self.dir.checkpoint, self.dir.best, self.dir.best_next):
                stale.unlink(missing_ok=True)
            return None
        return state

    def settle_best(self, selected: dict[str, Any] | None) -> None:
        """Leave best.pt holding the `selected` epoch (the checkpoint's history's best-val
        record; None: no epoch selectable yet). A best.pt.next of that epoch was written with the
        checkpoint but not yet renamed over best.pt; any other one is of epochs retrained now."""
        best, pending = self.dir.best, self.dir.best_next
        if pending.exists():
            if selected is not None and self.best_epoch_in(pending) == selected["epoch"]:
                os.replace(pending, best)
            else:
                pending.unlink()
        if selected is None:
            return
        if not best.exists():
            raise DamagedFile(best, "missing, though an epoch was selected")
        held = self.best_epoch_in(best, damaged_ok=False)
        if held != selected["epoch"]:
            raise DamagedFile(best, f"holds epoch {held}, not epoch {selected['epoch']}, which checkpoint.pt's "
                                    "history selects")

    def best_epoch_in(self, path: Path, damaged_ok: bool = True) -> int | None:
        """The epoch of a best.pt(.next); None for a damaged one where `damaged_ok`."""
        try:
            state = self.dir.load(path)
            return check_checkpoint(state, path, self.cfg.train.epochs, keys=("epoch", "model"))["epoch"]
        except DamagedFile:
            if damaged_ok:
                return None
            raise

    # ---- one epoch
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg.train
        loader = self.loaders["train"]
        self.context.epoch, self.context.num_batches, self.context.batch_index = epoch, len(loader), 0
        self.method.train()
        hook_start = time.perf_counter()
        self.method.on_epoch_start(epoch)
        items = epoch_items_of(self.method, epoch, loader.n)
        self.context.num_batches = loader.batches_over(items)
        hook_seconds = time.perf_counter() - hook_start
        lr = self.context.optimizer.param_groups[0]["lr"]  # after the hook, which may reset it
        losses = LossTally(lazy=self.device.type != "cpu")
        start = time.perf_counter()
        bar = tqdm(loader(epoch_generator(cfg.seed, epoch), items=items), total=self.context.num_batches,
                   desc=f"epoch {epoch}/{cfg.epochs - 1}", leave=False,
                   disable=True if not cfg.progress else None, dynamic_ncols=True)  # None: off when not a TTY
        for index, batch in enumerate(bar):
            self.context.batch_index = index
            with self.passes.step():
                step = self.method.training_step(batch)
            losses.add(step, len(batch), index)
            self.steps += 1
            if not bar.disable and index % PROGRESS_EVERY == 0:  # a host sync: rarely, and only when shown
                bar.set_postfix(loss=f"{float(step['loss']):.3f}", refresh=False)
        means = losses.means()  # the epoch's one host sync
        seconds = time.perf_counter() - start
        losses.check(epoch)
        self.context.scheduler.step()
        hook_start = time.perf_counter()
        self.method.on_epoch_end(epoch)
        hook_seconds += time.perf_counter() - hook_start
        # `seconds` are the steps' (samples/s is their throughput); `hook_seconds` the method's
        # epoch-level work (prototypes, diagnoses, projections), which its cost includes
        return {**means, "lr": lr, "seconds": seconds, "hook_seconds": hook_seconds,
                "samples_per_s": losses.samples / seconds if seconds else 0.0}

    def evaluate(self, split: str) -> Evaluation:
        return evaluate(self.method, self.loaders[split](), self.context.autocast)

    # ---- the whole run
    def fit(self, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
        cfg = self.cfg
        select = cfg.eval.select_metric
        first = self.resume()
        history = self.dir.read_metrics()
        trackers = open_trackers(cfg, self.dir, history)  # re-logs the checkpoint's epochs (bench.tracking)
        for epoch in range(first, cfg.train.epochs):
            train = self.train_epoch(epoch)
            record = {"epoch": epoch, "lr": train.pop("lr"), "train": train}
            val = self.evaluate("val")
            record["val"] = val.metrics
            self.method.on_validation_end(epoch, val.metrics)
            record["test"] = self.evaluate("test").metrics
            record["method"] = method_record(self.method, val.logs)
            if cfg.eval.contribution:
                record["contribution"] = contribution(self.method, self.loaders["val"], self.context.autocast,
                                                      cfg.eval.contribution_mask)
            record["selectable"] = self.method.selectable(epoch)
            history.append(record)
            self.dir.write_metrics(history)  # the whole (small) file rewritten: an atomic append
            trackers.log_epoch(epoch, record)
            due = self.schedule.due(epoch)
            if best_epoch(history, select) is record:  # kept until the next checkpoint: a copy, unless now
                state = self.method.state_dict()
                self.new_best = {"epoch": epoch, "model": state if due else snapshot(state)}
            if due:
                with self.schedule.writing():
                    self.save_checkpoint(epoch, history)
            self.dir.set_status("running", epochs_done=epoch + 1, epochs=cfg.train.epochs)
            if on_epoch:
                on_epoch(epoch, record)
        trackers.close()
        return self.summarise()

    def summarise(self) -> dict[str, Any]:
        cfg = self.cfg
        history = self.dir.read_metrics()
        select = cfg.eval.select_metric
        best_val, best_test = best_epoch(history, select), best_epoch(history, select, split="test")
        if best_val is None:
            raise RunFailed(f"method {cfg.method['name']!r} marked no epoch as selectable")
        probes, contributions = {}, {}
        if cfg.eval.probe or cfg.eval.contribution:
            self.method.load_state_dict(self.dir.load(self.dir.best)["model"])
        if cfg.eval.contribution:
            contributions = {"epoch": best_val["epoch"], "val": best_val.get("contribution"),
                             "test": contribution(self.method, self.loaders["test"], self.context.autocast,
                                                  cfg.eval.contribution_mask)}
        if cfg.eval.probe:
            passes = {"train": self.loaders["train_plain"](), "val": self.loaders["val"](),
                      "test": self.loaders["test"]()}
            probes = probe_all(self.method, passes, self.context.autocast, cfg.eval.probe_c_grid,
                               cfg.eval.probe_max_iter)
        return {
            "run_id": self.dir.run_id,
            "dataset": cfg.dataset["name"],
            "method": cfg.method["name"],
            "method_family": type(self.method).family,
            "fusion": cfg.model.fusion,
            "seed": cfg.train.seed,
            "epochs": cfg.train.epochs,
            "selection": f"best val {select}",
            "best_val": pick(best_val),
            "best_test": {**pick(best_test), "note": "selected on test (the papers' protocol); optimistic"},
            "last": pick(history[-1]),
            "probes": probes,
            "contribution": contributions,
            "probe_selection": "logistic regression on frozen best-val encoder features; C chosen on val",
            "cost": self.cost(history),
        }

    def cost(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        # the method's epoch hooks count (records written before they were timed have none)
        seconds = [r["train"]["seconds"] + r["train"].get("hook_seconds", 0.0) for r in history]
        steps = max(self.steps, 1)
        if self.device.type == "cuda":
            peak = {"peak_gpu_mem_mb": torch.cuda.max_memory_allocated(self.device) / 2**20}
        else:
            peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        return {
            "device": str(self.device),
            "seconds_per_epoch": float(np.mean(seconds)),
            "samples_per_s": float(np.mean([r["train"]["samples_per_s"] for r in history])),
            "forward_passes_per_step": self.passes.calls / (steps * self.passes.n_encoders),
            "backward_passes_per_step": self.context.backward_passes / steps,
            **peak,
            "threads": self.threads,
            # in the process that finished the run: checkpoints written and the seconds they took
            "checkpoints": self.schedule.writes,
            "checkpoint_s": self.schedule.write_s,
        }


def method_record(method: Method, val_logs: dict[str, float]) -> dict[str, Any]:
    """The epoch record's `method` entry: the method's `epoch_log()` and its evaluation logs
    averaged over the validation split (the test split's are not recorded: nothing is chosen on test)."""
    log = method.epoch_log()
    both = sorted(set(log) & set(val_logs))
    if both:
        raise ValueError(f"{type(method).__name__} logs {', '.join(map(repr, both))} both in epoch_log() and in "
                         "Prediction.logs; give each quantity one name")
    return {**log, **val_logs}


def pick(record: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": record["epoch"], "val": record["val"], "test": record["test"]}


def run(cfg: RunConfig, store: Store, datasets: DatasetSource = build_dataset,
        on_claim: Callable[[RunDir], None] | None = None, on_epoch: EpochCallback | None = None) -> RunResult:
    """Train `cfg` into the store: skip it if finished, resume it if started, else start it.

    The run is trained under its claim (bench.claim), held until this returns: a run another
    process holds is left alone (state `elsewhere`, its status untouched), and one that finished
    while the claim was awaited is skipped. `on_claim` (a launcher's placement) is called once
    the claim is taken; `on_epoch` after each epoch trained here (it may raise RunPruned), after
    the epoch reporter of a tuning trial's run (`cfg.trial`, bench.trial).
    A config the method rejects (a ConfigError while building) raises before anything is written.
    Any other failure marks the run `failed` with its cause and raises RunFailed;
    whatever the run had recorded (metrics, checkpoints) stays as it was.
    """
    run_dir = store.run_dir(cfg.group, cfg.run_id())
    if run_dir.done():
        return RunResult(run_dir.run_id, str(run_dir.path), "skipped", run_dir.read_summary())
    try:
        trainer: Trainer | Exception = Trainer(cfg, run_dir, datasets)  # builds data and model; writes nothing
    except ConfigError:
        raise
    except Exception as e:
        trainer = e  # the run's failure, recorded once its claim is taken
    claim = try_claim(run_dir)
    if claim is None:
        return RunResult(run_dir.run_id, str(run_dir.path), "elsewhere", {}, elsewhere_line(run_dir))
    with claim:
        if has_summary(run_dir):  # finished by the holder this process waited for
            return finished_meanwhile(run_dir, cfg)
        if on_claim:
            on_claim(run_dir)
        record_start(run_dir, cfg)
        if isinstance(trainer, Exception):
            raise record_failure(run_dir, trainer) from trainer
        log.info(f"{run_dir.run_id}: {trainer.device}, {trainer.threads} thread(s) ({trainer.threads_why}), "
                 f"checkpoint every {cfg.train.checkpoint_every}")
        return train_claimed(cfg, run_dir, trainer, with_trial_reporter(cfg, on_epoch))


def has_summary(run_dir: RunDir) -> bool:
    """A readable summary.json: the run finished (a damaged one is rewritten by resuming)."""
    try:
        return run_dir.read_summary() is not None
    except DamagedFile:
        return False


def finished_meanwhile(run_dir: RunDir, cfg: RunConfig) -> RunResult:
    """A run whose summary exists is finished, whatever a launcher wrote over its status since."""
    if run_dir.status()["state"] != "finished":
        run_dir.set_status("finished", epochs_done=cfg.train.epochs, epochs=cfg.train.epochs)
    return RunResult(run_dir.run_id, str(run_dir.path), "skipped", run_dir.read_summary())


def with_trial_reporter(cfg: RunConfig, on_epoch: EpochCallback | None) -> EpochCallback | None:
    """`on_epoch`, after the trial's epoch reporter when the run is a tuning trial (bench.trial)."""
    if cfg.trial is None:
        return on_epoch
    from mmbalance.bench.trial import epoch_reporter

    report = epoch_reporter(cfg.trial, cfg.eval.select_metric)

    def both(epoch: int, record: dict[str, Any]) -> None:
        report(epoch, record)
        if on_epoch:
            on_epoch(epoch, record)

    return both


def train_claimed(cfg: RunConfig, run_dir: RunDir, trainer: Trainer,
                  on_epoch: EpochCallback | None = None) -> RunResult:
    try:
        summary = trainer.fit(on_epoch)
        if cfg.eval.robustness:  # before the summary: a failure here resumes (from the last epoch) and retries
            evaluate_trained(trainer, run_dir)
        run_dir.write_summary(summary)
    except KeyboardInterrupt:
        run_dir.set_status("interrupted", error="interrupted by the user (KeyboardInterrupt)")
        raise
    except RunPruned as e:
        run_dir.set_status("pruned", error=str(e))
        return RunResult(run_dir.run_id, str(run_dir.path), "pruned", {}, str(e))
    except RunCancelled:  # its job was cancelled: its status says so already, its checkpoint stays
        raise
    except Exception as e:
        raise record_failure(run_dir, e) from e
    run_dir.set_status("finished", epochs_done=cfg.train.epochs, epochs=cfg.train.epochs)
    return RunResult(run_dir.run_id, str(run_dir.path), "finished", summary)


def record_start(run_dir: RunDir, cfg: RunConfig) -> None:
    """Mark the run running. Its damaged records are kept aside and listed in status.json
    (set_status does so for status.json): config.yaml is written again from `cfg`, metrics.jsonl
    and summary.json from the checkpoint (Trainer.resume, then summarise)."""
    damaged = [run_dir.set_aside(e) for e in run_dir.damaged() if e.path != run_dir.status_file]
    if not run_dir.config.exists():
        run_dir.write_config(cfg.to_dict())
    run_dir.set_status("running", epochs_done=0, epochs=cfg.train.epochs)
    if damaged:
        run_dir.record_damage(*damaged)


def record_failure(run_dir: RunDir, error: BaseException) -> RunFailed:
    """Mark the run failed with its cause: the first line of the error, its traceback (and the
    epoch and batch for a non-finite loss)."""
    trace = "".join(traceback.format_exception(error))
    if isinstance(error, NonFiniteLoss):
        run_dir.set_status("failed", error=str(error), epoch=error.epoch, batch=error.batch, traceback=trace)
        return RunFailed(f"run {run_dir.run_id} failed: {error} ({run_dir.path})")
    if isinstance(error, OSError):  # disk full, say: the OS's own words and the file
        first_line = os_message(error)
    else:
        first_line = (f"{type(error).__name__}: {error}".splitlines() or [""])[0]
    run_dir.set_status("failed", error=first_line, traceback=trace)
    return RunFailed(f"run {run_dir.run_id} failed: {first_line} ({run_dir.path})")
