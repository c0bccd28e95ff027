"""The method contract: one class per method, the harness does everything else.

A method owns its forward, backward and optimizer step(s) in `training_step`, like PyTorch
Lightning's manual optimization; the harness attaches `StepHelpers` so that no method
re-implements autocast, backward or step. Non-tensor state that must survive a resume (a stage,
selected dimensions...) goes through nn.Module's `get_extra_state`/`set_extra_state`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel

from mmbalance.core.params import NoParams
from mmbalance.core.types import Batch, Modality, Prediction


@dataclass
class MethodSetup:
    """What the harness hands every method: identical encoders, classes and the model config."""

    encoders: nn.ModuleDict
    num_classes: int
    modalities: tuple[Modality, ...]
    fusion: str = "concat"
    conditioning: str | None = None
    epochs: int = 1  # train.epochs: methods with stages check their lengths against it

    def feature_dims(self, names: tuple[str, ...] | None = None) -> dict[str, int]:
        names = names or tuple(m.name for m in self.modalities)
        return {m: self.encoders[m].out_dim for m in names}


@dataclass
class StepHelpers:
    """What the harness lends a method for its steps: backward/step/zero_grad with the harness's
    precision policy, the position in the run, a fresh optimizer on request, and an unshuffled
    pass over the training split. It counts backward passes for the cost report."""

    optimizer: torch.optim.Optimizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    # rebuilds optimizer and scheduler from the config over method.param_groups()
    rebuild: Callable[[], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]] | None = None
    # unshuffled batches of the training split, already on the device
    train_batches: Callable[[], Iterator[Batch]] | None = None
    epoch: int = 0  # 0-based epoch being trained
    batch_index: int = 0  # 0-based index of the batch in this epoch
    num_batches: int = 0  # batches per epoch
    backward_passes: int = field(default=0, init=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        # bf16 keeps fp32's exponent range, so no loss scaling is needed
        loss.backward(**kwargs)
        self.backward_passes += 1

    def grad(self, outputs: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """torch.autograd.grad, counted as a backward pass."""
        self.backward_passes += 1
        return torch.autograd.grad(outputs, inputs, **kwargs)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # set_to_none=False reproduces torch < 2.0, where zeroed (not None) grads still receive
        # momentum and weight-decay updates at the next step
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def reset_optimizer(self) -> None:
        """A fresh optimizer and scheduler (no momentum, base learning rate), e.g. at a stage start.
        The parameter groups must stay the same through a run, so that resume can load them."""
        if self.rebuild is None:
            raise RuntimeError("this harness cannot rebuild the optimizer")
        self.optimizer, self.scheduler = self.rebuild()


class Method(nn.Module):
    """Base class. Subclasses set `Params` and implement `training_step` and `predict`."""

    Params: ClassVar[type[BaseModel]] = NoParams
    registry_name: ClassVar[str]

    def __init__(self, params: BaseModel, setup: MethodSetup) -> None:
        super().__init__()
        self.params = params
        self.num_classes = setup.num_classes
        self.encoders = setup.encoders
        self.helpers: StepHelpers | None = None

    # ---- harness plumbing
    def attach(self, helpers: StepHelpers) -> None:
        self.helpers = helpers

    def _h(self) -> StepHelpers:
        if self.helpers is None:
            raise RuntimeError("the harness attaches StepHelpers before training; call attach()")
        return self.helpers

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._h().autocast() if self.helpers else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self._h().backward(loss, **kwargs)

    def optimizer_step(self) -> None:
        self._h().step()

    def zero_grad_(self, set_to_none: bool = True) -> None:
        self._h().zero_grad(set_to_none)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.encoders.keys())

    # ---- what a method implements
    def training_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step on `batch`; returns scalar losses (must include 'loss')."""
        raise NotImplementedError

    def predict(self, batch: Batch) -> Prediction:
        raise NotImplementedError

    # ---- defaults a method may override
    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](inputs[m]) for m in self.modality_names}

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Frozen per-modality features for the linear probes: the encoders' outputs."""
        return self.encode(batch.inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.trainable())}]

    def on_epoch_start(self, epoch: int) -> None:
        """Called before epoch `epoch` (0-based) trains."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after epoch `epoch` trained, before it is evaluated."""

    def on_validation_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Called with epoch `epoch`'s validation metrics (never the test split's)."""

    def epoch_log(self) -> dict[str, Any]:
        """Quantities that explain the method (recorded per epoch in metrics.jsonl under 'method')."""
        return {}

    def selectable(self, epoch: int) -> bool:
        """Whether epoch `epoch` may be selected as the reported one (e.g. only the last stage)."""
        return True

    @staticmethod
    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def trainable(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)
