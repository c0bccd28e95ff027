"""The method contract: one class per method, the harness does everything else.

A method owns its forward, backward and optimizer step(s) in `training_step`, like PyTorch
Lightning's manual optimization. The harness lends it a `StepContext` (`self.step_context`,
attached before training) so that no method re-implements precision, backward or step:

    ctx = self.step_context
    ctx.epoch, ctx.batch_index, ctx.num_batches  # the position in the run (0-based)
    with ctx.autocast(): ...                     # the harness's precision (bf16 on CUDA with train.amp)
    ctx.backward(loss)                           # loss.backward(), counted for the cost report
    ctx.grad(outputs, inputs)                    # torch.autograd.grad, counted likewise
    ctx.step()                                   # the optimizer's step
    ctx.zero_grad(set_to_none=True)              # the optimizer's zero_grad
    ctx.reset_optimizer()                        # a fresh optimizer and schedule (a stage start)
    ctx.reset_optimizer_state()                  # forget momentum, keep the schedule where it is
    ctx.train_batches()                          # an unshuffled pass over the training split
    ctx.val_batches()                            # an in-order pass over the validation split
    ctx.train_batches(generator)                 # a pass shuffled by `generator`: an epoch's training batches
    ctx.holdout_batches()                        # an unshuffled pass over the held-out part of train
    ctx.seed                                     # the run's seed (train.seed), for a method's own generators
    with ctx.trial(self): ...                    # steps on trial: undone when the block ends

These are the only ways to do each of these things: a method calls no optimizer, scheduler or
loader of its own, and touches no private name of the harness or of torch. `predict` is free of
side effects: quantities a method wants logged at evaluation come back in `Prediction.logs`
(one number per batch), and the harness averages them over the split. Non-tensor state that must
survive a resume (a stage, selected dimensions...) goes through nn.Module's
`get_extra_state`/`set_extra_state`, or buffers.

The two passes are for epoch-level work in the hooks (prototypes, projections, diagnoses), never
for the steps. Their batches are the same for any number of loader workers and on a resume; a
method that draws random numbers around them takes them from a generator of its own. The
validation split is also the split the harness selects epochs on, so a method that lets it shape
training (as its release does with a held-out split) says so in its docstring.

A method may need other runs trained first (UMT's unimodal teachers, UME's unimodal members):
`Method.requires(params, modalities)` names them, each as the overrides that turn this run's config
into the required run's. The harness adds them to the plan, trains them first, and hands their
trained methods (best.pt, frozen, eval mode) in `MethodSetup.required`; `setup.require(name)`
builds one. A run whose requirement is not finished fails with a one-line error naming it.

A method that estimates something on data it does not train on (Gradient-Blending's
overfitting-to-generalisation ratios) returns a fraction from `holdout_fraction()`: the harness
then trains it on the rest of the training split only (`ctx.train_batches` included) and lends it
the held-out rows, drawn by the run's seed alone, through `ctx.holdout_batches()`. Validation and
test are never lent to a method; probes and metrics are computed as for every method. Inside
`ctx.trial(module)` a method may train on trial (its own side models, as the field's "temp
model"): the steps use a fresh optimizer, and on exit the module's parameters, buffers and
gradients, the optimizer and the schedule are as they were; the passes are counted.

A data-level method (the field's resampling) chooses the items an epoch trains on:
`epoch_items(epoch)` returns rows of the training split (the order of `ctx.train_batches()`),
repeated or left out, in any order, or None (the default: every row once). The harness shuffles
them by the epoch's generator, as it shuffles the rows of any epoch, and batches them; each
training batch's `ids` are its samples' positions in the method's list, so the method finds what
it decided for each sample (a modality to mask, a weight) in its step. The list must follow from
the method's state at the epoch's start and the epoch (a resume asks again), and random choices
come from a generator of the method's own seeded by `ctx.seed`, so that an epoch's batches are the
same with any number of loader workers and after a resume.

Every method names its `family`, the stage of training it adjusts, in the field's taxonomy
(BalanceBenchmark's four families: `data` at the input, `feed-forward` at the features and fusion,
`objective` at the loss, `optimisation` on the backward path and the update), or `baseline` (joint
training) or `reference` (a unimodal-only model). Reports group their method tables by it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel

from mmbalance.core.errors import ConfigError
from mmbalance.core.params import NoParams
from mmbalance.core.types import Batch, Modality, Prediction

# the order reports list the families in
FAMILIES = ("baseline", "data", "feed-forward", "objective", "optimisation", "reference")


@dataclass
class MethodSetup:
    """What the harness hands every method: identical encoders, classes and the model config."""

    encoders: nn.ModuleDict
    num_classes: int
    modalities: tuple[Modality, ...]
    fusion: str = "concat"
    conditioning: str | None = None
    epochs: int = 1  # train.epochs: methods with stages check their lengths against it
    # requirement name (Method.requires) -> builds that run's trained method, frozen, in eval mode
    required: dict[str, Callable[[], Method]] = field(default_factory=dict)

    def feature_dims(self, names: tuple[str, ...] | None = None) -> dict[str, int]:
        names = names or tuple(m.name for m in self.modalities)
        return {m: self.encoders[m].out_dim for m in names}

    def require(self, name: str) -> Method:
        """The trained method of this run's requirement `name` (see Method.requires)."""
        if name not in self.required:
            raise ConfigError(f"requirement {name!r} was not handed to this method (handed: "
                              f"{', '.join(self.required) or 'none'}); the harness builds Method.requires' "
                              "runs into MethodSetup.required, and a test must do the same")
        return self.required[name]()


# builds an optimizer and its schedule over method.param_groups(); the schedule may be None in tests
OptimizerFactory = Callable[[], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]]


def _no_validation_pass() -> Iterable[Batch]:
    raise RuntimeError("this StepContext lends no validation pass (val_batches): the harness's does "
                       "(bench.train.Trainer); a test passes StepContext(..., val_batches=...)")


def no_holdout() -> Iterable[Batch]:
    raise RuntimeError("ctx.holdout_batches(): the harness holds out no part of train for this method; a method "
                       "that needs one returns a fraction in (0, 1) from Method.holdout_fraction()")


@dataclass(eq=False)
class StepContext:
    """What the harness lends a method for its steps (see the module docstring). The harness sets
    the position (`epoch`, `batch_index`, `num_batches`) before each step and reads
    `backward_passes`, `optimizer` and `scheduler` for the cost report and the checkpoints;
    a method only reads them."""

    build_optimizer: OptimizerFactory
    # batches of the training split (the rows the method trains on), already on the device:
    # unshuffled at the evaluation batch size, or with a torch.Generator shuffled by it at the
    # training batch size (drop_last as configured)
    train_batches: Callable[..., Iterable[Batch]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    epoch: int = 0  # 0-based epoch being trained
    batch_index: int = 0  # 0-based index of the batch in this epoch
    num_batches: int = 0  # batches per epoch
    # in-order batches of the validation split (the evaluation views), already on the device;
    # the default refuses clearly: only the harness's context lends one (a test passes its own)
    val_batches: Callable[[], Iterable[Batch]] = _no_validation_pass
    # unshuffled batches of the held-out part of train (Method.holdout_fraction), test-time views
    holdout_batches: Callable[[], Iterable[Batch]] = no_holdout
    seed: int = 0  # the run's seed (train.seed): seeds a method's own generators (epoch_items' choices)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(init=False)
    backward_passes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.optimizer, self.scheduler = self.build_optimizer()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """loss.backward(**kwargs), counted as a backward pass."""
        # bf16 keeps fp32's exponent range, so no loss scaling is needed
        loss.backward(**kwargs)
        self.backward_passes += 1

    def grad(self, outputs: torch.Tensor, inputs: Sequence[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """torch.autograd.grad, counted as a backward pass."""
        self.backward_passes += 1
        return torch.autograd.grad(outputs, inputs, **kwargs)

    def step(self) -> None:
        """One step of the optimizer over the gradients as they are now."""
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's zero_grad (every parameter it steps, whichever module holds it)."""
        # set_to_none=False reproduces torch < 2.0, where zeroed (not None) grads still receive
        # momentum and weight-decay updates at the next step
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def reset_optimizer(self) -> None:
        """A fresh optimizer and scheduler (no momentum, base learning rate), e.g. at a stage start.
        The parameter groups must stay the same through a run, so that resume can load them."""
        self.optimizer, self.scheduler = self.build_optimizer()

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's per-parameter state (momentum buffers, Adam's moments), as a
        freshly built optimizer has none, keeping its learning rates and schedule where they are:
        a phase start in a run whose schedule runs on through the phases (ReconBoost)."""
        self.optimizer.state.clear()

    @contextlib.contextmanager
    def trial(self, module: nn.Module) -> Iterator[None]:
        """Steps taken inside the block are on trial: they go to a fresh optimizer (base learning
        rate, no state; `build_optimizer`, over the method's parameter groups), and on exit
        `module`'s parameters, buffers and gradients, the optimizer and the schedule are as they
        were before the block (also when it raises). Its passes count as any others."""
        state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                 for k, v in module.state_dict().items()}
        grads = [(p, None if p.grad is None else p.grad.clone()) for p in module.parameters()]
        kept = self.optimizer, self.scheduler
        self.optimizer, self.scheduler = self.build_optimizer()
        try:
            yield
        finally:
            self.optimizer, self.scheduler = kept
            module.load_state_dict(state)
            for p, g in grads:
                p.grad = g


@contextlib.contextmanager
def zeroed_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Within the block each module's output is replaced by zeros of its shape; yields how often
    each was called (a module never called masked nothing)."""
    calls = dict.fromkeys(modules, 0)

    def zero(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            return torch.zeros_like(output)
        return hook

    handles = [module.register_forward_hook(zero(name)) for name, module in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class Method(nn.Module):
    """Base class. Subclasses set `Params` and implement `training_step` and `predict`."""

    Params: ClassVar[type[BaseModel]] = NoParams
    registry_name: ClassVar[str]
    family: ClassVar[str]  # one of FAMILIES

    def __init__(self, params: BaseModel, setup: MethodSetup) -> None:
        super().__init__()
        check_family(type(self))
        self.params = params
        self.num_classes = setup.num_classes
        self.encoders = setup.encoders
        self._step_context: StepContext | None = None

    @classmethod
    def requires(cls, params: BaseModel, modalities: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """The runs this run needs trained first, by name: each as dotted overrides that turn this
        run's config into the required run's (e.g. {"method": {"name": "unimodal", "modality": m}}:
        same data, encoders, seed and budget, another method). Default: none."""
        return {}

    # ---- harness plumbing
    def attach(self, context: StepContext) -> None:
        """The harness lends `context` for the steps to come (a test may attach its own)."""
        self._step_context = context

    @property
    def step_context(self) -> StepContext:
        """The harness's StepContext: the position in the run, backward/grad/step/zero_grad with
        the harness's precision policy, a fresh optimizer, in-order passes over train and val."""
        if self._step_context is None:
            # not AttributeError: nn.Module would turn that into a misleading "has no attribute"
            raise RuntimeError(f"{type(self).__name__}.step_context is used before the harness attached one; "
                               "the harness calls method.attach(StepContext(...)) before training "
                               "(a test must do the same)")
        return self._step_context

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
    def predict_masked(self, batch: Batch, present: frozenset[str], mask: str = "features") -> Prediction:
        """The prediction with only the modalities in `present`, for the modality contributions
        (bench.contribution); defined through `predict` for every method. mask="features": each
        other modality's features (its encoder's output) are zeros where the method fuses them;
        mask="input": its input is zeroed and still passed through its encoder (BalanceBenchmark's
        Calculate_Shapley). A method that runs an encoder other than as one call of
        `self.encoders[m]` (Greedy's blocks with MMTMs between) overrides the features case."""
        if mask == "input":
            inputs = {m: x if m in present else torch.zeros_like(x) for m, x in batch.inputs.items()}
            return self.predict(Batch(inputs, batch.labels, batch.ids))
        absent = [m for m in self.modality_names if m not in present]
        with zeroed_outputs({m: self.encoders[m] for m in absent}) as calls:
            prediction = self.predict(batch)
        silent = [m for m in absent if not calls[m]]
        if silent:
            raise ConfigError(f"method {type(self).__name__} did not call its encoder of {silent[0]!r} as a whole, so "
                              "its features cannot be masked there; the method must override predict_masked, or "
                              "use eval.contribution_mask=input")
        return prediction

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](inputs[m]) for m in self.modality_names}

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Frozen per-modality features for the linear probes: the encoders' outputs."""
        return self.encode(batch.inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.trainable())}]

    def holdout_fraction(self) -> float:
        """The share of the training split held out of this method's training and lent to it by
        `ctx.holdout_batches()`; 0 (the default): none. Read once, when the harness builds the run."""
        return 0.0

    def on_epoch_start(self, epoch: int) -> None:
        """Called before epoch `epoch` (0-based) trains."""

    def epoch_items(self, epoch: int) -> Sequence[int] | None:
        """The rows of the training split that epoch `epoch` trains on (repeats allowed, any order),
        or None: every row once. Asked after `on_epoch_start(epoch)`; see the module docstring."""
        return None

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


def check_family(cls: type[Method]) -> None:
    """A method class must say which family it belongs to (reports group methods by it)."""
    family = getattr(cls, "family", None)
    if family not in FAMILIES:
        got = "does not set `family`" if family is None else f"sets family = {family!r}"
        raise ConfigError(f"method class {cls.__module__}.{cls.__qualname__} {got}; a method names the stage "
                          f"it adjusts as a class attribute, one of {', '.join(FAMILIES)}")
