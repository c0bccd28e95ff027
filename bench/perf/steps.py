"""What one training step of each method costs, relative to joint training in the same process.

Every method gets the same encoders (ResNet18, the reference repos' backbone), the same synthetic
batch (already on the device, so that only the step is timed) and the harness's own optimiser,
precision and device set-up. Methods are timed in interleaved rounds (joint, OGM-GE, ..., joint,
OGM-GE, ...), so that a machine that speeds up or slows down during the run moves every method
alike, and each one's fastest round is taken (timeit's rule: other work on the machine only ever
adds time). Staged methods are timed in the stage the ratio is about: MIE in its second stage
(the visual encoder, gradient projection on), DI-MML in stage 1 with DUC on.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from mmbalance.bench.config import RunConfig, TrainConfig
from mmbalance.bench.device import prepare_model
from mmbalance.bench.train import PassCounter, build_optimizer, build_scheduler, inner_encoders
from mmbalance.core.registry import METHODS
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import Method, MethodSetup, StepContext
from mmbalance.models import build_encoder


@dataclass(frozen=True)
class Shapes:
    """A dataset's input shapes: CREMA-D's `ogmge` pipeline at full size or scaled down."""

    name: str
    audio: tuple[int, ...]  # (1, F, T) spectrogram
    visual: tuple[int, ...]  # (3, T, H, W) frames
    batch: int
    classes: int = 6
    encoder: str = "resnet18"  # the reference repos' backbone; `quick` swaps in the small CNN

    def modalities(self) -> tuple[Modality, ...]:
        return (Modality("audio", "audio", self.audio), Modality("visual", "video", self.visual))


SHAPES = {
    "cremad": Shapes("CREMA-D ogmge: audio 1x257x188, 1 frame 3x224x224, batch 64",
                     (1, 257, 188), (3, 1, 224, 224), 64),
    # half the side, same batch: per-step costs that scale with the parameters (OGM-GE's noise,
    # optimiser steps) weigh against the convolutions as they do at full size, not 4x more
    "cpu": Shapes("CREMA-D ogmge at half size: audio 1x128x94, 1 frame 3x112x112, batch 64",
                  (1, 128, 94), (3, 1, 112, 112), 64),
    "quick": Shapes("tiny, small CNNs: audio 1x32x24, 1 frame 3x32x32, batch 8", (1, 32, 24), (3, 1, 32, 32), 8,
                    encoder="small_cnn"),
}


@dataclass(frozen=True)
class Variant:
    """One row: a method section, and the epoch whose step is timed (its start hook runs first)."""

    label: str
    method: dict[str, Any]
    epoch: int = 0
    target: float | None = None  # the bound on the step-time ratio to joint


VARIANTS = (
    Variant("joint", {"name": "joint"}),
    Variant("ogm_ge", {"name": "ogm_ge"}, target=1.10),
    Variant("mla", {"name": "mla"}, target=1.15),
    Variant("di_mml (stage 1, DUC on)", {"name": "di_mml", "stage1_epochs": 1, "stage2_epochs": 1,
                                         "duc_start_epoch": 0}, target=1.15),
    Variant("mie (paper SAM, stage 2)", {"name": "mie", "epoch_list": [1, 1], "sam": "paper"}, epoch=1, target=2.10),
    Variant("mie (code SAM, stage 2)", {"name": "mie", "epoch_list": [1, 1], "sam": "code"}, epoch=1, target=1.30),
    # the release's window opens at epoch 6; timed inside it (p_exe 0.7: drop steps and plain ones)
    Variant("opm (window open)", {"name": "opm", "modulation_starts": 0}, target=1.10),
    Variant("pmr", {"name": "pmr"}, target=1.10),
    # no bound stated: AGM runs every encoder three times (train, eval, zero sample), MMPareto backs twice
    Variant("agm", {"name": "agm"}),
    Variant("mmpareto", {"name": "mmpareto"}),
    # stage 1 (4 + 4 epochs a stage): phase 1 runs the learner, the other member without gradient
    # and the ga term's extra forward; phase 2 the whole ensemble
    Variant("reconboost (phase 1, stage 1)", {"name": "reconboost"}, epoch=8),
    Variant("reconboost (phase 2)", {"name": "reconboost"}, epoch=12),
    # no bound stated; epoch 0 is inside the window (k = 1): the regulation and the squared
    # gradients are timed with the step
    Variant("inforeg", {"name": "inforeg"}),
    # joint's step; its diagnosis runs between epochs (a schedule that fits the two-epoch set-up)
    Variant("relearning", {"name": "relearning", "variant": "balancebenchmark", "reinit_epoch": 1}),
    # a weighted loss: joint training's step (the learned schedule's once-an-epoch pass is no step)
    Variant("lfm", {"name": "lfm"}),
    Variant("mmcosine", {"name": "mmcosine"}),
    Variant("cml", {"name": "cml"}),
    Variant("amco", {"name": "amco"}),
    Variant("mbsd", {"name": "mbsd"}),
    # the UMT stage (teachers trained in the run, as the stored ones would be: same step); one
    # teacher forward per modality beside the student's
    Variant("umt (distilling)", {"name": "umt", "teachers": "in_run", "teacher_epochs": 1}, epoch=1),
    Variant("ume (members trained in the run)", {"name": "ume", "teachers": "in_run"}),
    # the step only (joint's plus the unimodal heads); its estimates cost (M + 1) x estimate_epochs
    # trial epochs every `interval` epochs on top, which runs count (forward/backward passes per step)
    Variant("gblending (step)", {"name": "gblending", "interval": 1, "estimate_epochs": 1}),
    # a re-sampled epoch's step (joint's, copies' modalities zeroed by a select); its valuation pass
    # runs once an epoch (its runs' hook_seconds), and the copies lengthen the epoch
    Variant("valuation (re-sampled epoch)", {"name": "valuation", "warmup": 0}),
    # MMTMs after layer2-4 and the learning speeds over every parameter; epoch 1: past the warm-up
    Variant("greedy", {"name": "greedy"}, epoch=1),
    # a remixed epoch of one batch: the epoch-start model's scores (1F), then, the batch being the
    # epoch's last, one step per modality on its samples (M x (1F + 1B)); in a run's epochs about
    # one step per batch (forward and backward passes per step in its summary)
    Variant("remix (remixing)", {"name": "remix", "warmup": 0}),
)


def synthetic_batch(shapes: Shapes, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = {m.name: torch.randn(shapes.batch, *m.shape, generator=g) for m in shapes.modalities()}
    labels = torch.arange(shapes.batch) % shapes.classes  # every class present (DUC's prototypes)
    return Batch(inputs, labels, torch.arange(shapes.batch)).to(device)  # ids: as the harness's loader sets them


@dataclass
class Subject:
    """A method built as the harness builds it, ready to step on one batch."""

    variant: Variant
    method: Method
    context: StepContext
    passes: PassCounter
    steps: int = 0
    times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")

    def step(self, batch: Batch) -> None:
        with self.passes.step():
            self.method.training_step(batch)
        self.steps += 1


def build_subject(variant: Variant, shapes: Shapes, batch: Batch, train: TrainConfig, device: torch.device) -> Subject:
    torch.manual_seed(0)
    modalities = shapes.modalities()
    encoders = nn.ModuleDict({m.name: build_encoder({"name": shapes.encoder}, m) for m in modalities})
    setup = MethodSetup(encoders, shapes.classes, modalities, "concat", None, epochs=2)
    cls = METHODS.get(variant.method["name"], "method.name")
    try:
        params = METHODS.params_of(variant.method, "method.name")
    except ValidationError as e:
        from mmbalance.core.errors import ConfigError

        raise ConfigError(f"bench: method {variant.method['name']!r} cannot be built with its default parameters "
                          f"({e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}); bench times methods whose "
                          "parameters all have defaults") from None
    method = cls(params, setup)
    prepare_model(method, method.encoders, train, device)
    cfg = RunConfig(train=train)

    def rebuild() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(cfg, method.param_groups())
        return optimizer, build_scheduler(cfg, optimizer)

    # every pass over train (shuffled or not) and over a held-out part is the timed batch
    context = StepContext(rebuild, lambda generator=None: iter([batch, batch]), device, train.amp, num_batches=1,
                          holdout_batches=lambda: iter([batch]))
    method.attach(context)
    method.train()
    for epoch in range(variant.epoch + 1):  # stage starts (MIE's projection, DI-MML's selection)
        context.epoch = epoch
        method.on_epoch_start(epoch)
    passes = PassCounter(method.encoders, *inner_encoders(method))
    return Subject(variant, method, context, passes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(subject: Subject, batch: Batch, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        subject.step(batch)
    sync(device)
    return (time.perf_counter() - start) / steps


class PeakMemory:
    """The memory a block adds at its peak above what was in use before it, in MB: the CUDA
    allocator's peak on a GPU; on CPU the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs after returning freed heap to the system)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            self.before = proc_status_kb("VmRSS") * 1024
            reset_high_water_mark()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = proc_status_kb("VmHWM") * 1024
        self.mb = max(peak - self.before, 0) / 2**20


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes freed heap
        pass


def reset_high_water_mark() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: VmHWM stays the process's peak so far
        pass


def proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux; a process-wide peak


def state_mb(subject: Subject) -> float:
    """Parameters, buffers and optimiser state of the method, in MB."""
    tensors = [*subject.method.parameters(), *subject.method.buffers()]
    for state in subject.context.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def measure_steps(shapes: Shapes, device: torch.device, *, variants: Sequence[Variant] = VARIANTS,
                  rounds: int = 5, steps: int = 3, warmup: int = 2, train: TrainConfig | None = None,
                  progress: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
    """One row per variant: seconds per step (fastest round), its ratio to joint, samples/s,
    peak MB (model state + the step's own peak), forward and backward passes per step."""
    train = train or TrainConfig()
    batch = synthetic_batch(shapes, device)
    subjects = [build_subject(v, shapes, batch, train, device) for v in variants]
    for s in subjects:
        with PeakMemory(device) as peak:
            for _ in range(warmup):
                s.step(batch)
        s.peak_mb = state_mb(s) + peak.mb
    for s in subjects:  # the pass counts are for timed steps only
        s.passes.calls, s.context.backward_passes, s.steps = 0, 0, 0
    for r in range(rounds):
        for s in subjects:
            s.times.append(timed(s, batch, steps, device))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    joint = min(subjects[0].times)
    return [row(s, joint, shapes.batch) for s in subjects]


def row(s: Subject, joint_s: float, batch: int) -> dict[str, Any]:
    seconds = min(s.times)
    return {
        "method": s.variant.label,
        "step_s": seconds,
        "ratio_to_joint": seconds / joint_s,
        "target": s.variant.target,
        "samples_per_s": batch / seconds,
        "peak_mb": s.peak_mb,
        "forward_passes_per_step": s.passes.calls / (s.steps * s.passes.n_encoders),
        "backward_passes_per_step": s.context.backward_passes / s.steps,
        "spread": statistics.median(s.times) / seconds - 1,  # how far the typical round was from the fastest
    }


def variants_named(names: Sequence[str] | None) -> tuple[Variant, ...]:
    """Joint (always first: the ratios' reference), then the built-in variants of the methods in
    `names`, and any other registered method (a user's own) with its default parameters."""
    if not names:
        return VARIANTS
    from mmbalance.core.errors import ConfigError

    registered = METHODS.names()
    unknown = sorted(set(names) - set(registered))
    if unknown:
        raise ConfigError(f"bench --methods: unknown {', '.join(unknown)}; registered methods: {', '.join(registered)}")
    built_in = tuple(v for v in VARIANTS if v.method["name"] == "joint" or v.method["name"] in names)
    covered = {v.method["name"] for v in built_in}
    return built_in + tuple(Variant(n, {"name": n}) for n in dict.fromkeys(names) if n not in covered)
