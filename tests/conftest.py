from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from mmbalance.bench.config import RunConfig, load_config
from mmbalance.bench.store import Store
from mmbalance.core.types import Batch, Modality
from mmbalance.methods.base import MethodSetup, StepContext

# a fast config: the Gaussian generator, tiny MLPs, a few epochs, a checkpoint after each (tests
# interrupt runs at chosen epochs; the default, auto, writes by time)
FAST = [
    "dataset.name=gaussian",
    "train.epochs=4",
    "train.checkpoint_every=1",
    "train.batch_size=32",
    "train.progress=false",
    "optim.lr=0.05",
    "schedule.name=step",
    "schedule.step_size=2",
    "eval.probe_c_grid=[0.1,1.0]",
]


@pytest.fixture(autouse=True, scope="module")
def _module_temp_dirs_go_with_the_module(request, tmp_path_factory) -> Iterator[None]:
    """The temp directories a module made (its module-scoped fixtures' prepared caches and stores,
    tens of MB each) are removed when the module ends, unless one of its tests failed: with
    `tmp_path_retention_policy = "failed"` (pyproject) a passing test's tmp_path goes at its end,
    but tmp_path_factory's directories would stay until the session ends and add up to over a
    GB on CI's small disk. No fixture here is session-scoped, so none outlives its module."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


def as_at_a_terminal() -> None:
    """Popen's preexec_fn for a command a test sends a Ctrl-C (SIGINT): the disposition a shell at
    a terminal starts it with. A test runner started as a `&` job of a script has SIGINT ignored,
    its children inherit that, and a Python started so never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def fast_config() -> Callable[..., RunConfig]:
    def make(*overrides: str) -> RunConfig:
        return load_config(None, [*FAST, *overrides])

    return make


@pytest.fixture
def one_torch_thread():
    """Tiny models at small batches: a second torch thread buys little on a quiet machine, and on
    a shared one whose cores other processes keep busy it can cost several times the run
    (bench/perf/train_speed.py --threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "results")


class Logged:
    """What the suite logged (INFO and up), as capsys has what was printed: `read()` returns the
    messages since the last read, one a line, as the command line shows them without prefixes."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def read(self) -> str:
        text = "\n".join(r.getMessage() for r in self.caplog.records if r.name.startswith("mmbalance"))
        self.caplog.clear()
        return text


@pytest.fixture
def logged(caplog) -> Logged:
    """The progress lines of library calls (launch, launch_local): a library leaves logging to its
    caller, so without this (or the command line's -v/-q handling) INFO is not even recorded."""
    caplog.set_level(logging.INFO, logger="mmbalance")
    return Logged(caplog)


def stand_in_summary(acc: float = 0.5, epochs: int = 1) -> dict:
    """The smallest summary.json the results schema (bench/schema.py) accepts: a finished run
    in tests that train nothing."""
    block = {"epoch": epochs - 1, "test": {"acc": acc}}
    return {"epochs": epochs, "best_val": block, "best_test": block, "last": block}


def step_recording_grads(method, batch: Batch) -> tuple[dict, dict[str, torch.Tensor]]:
    """One training step of `method` (attached to a step context); its outputs and every gradient
    as the optimizer saw it."""
    seen: dict[str, torch.Tensor] = {}
    context = method.step_context
    original = context.step

    def record():
        seen.update({n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None})
        original()

    context.step = record
    try:
        out = method.training_step(batch)
    finally:
        context.step = original
    return out, seen


def step_context(optimizer: Callable[[], torch.optim.Optimizer], batches: Sequence[Batch] = (),
                 val: Sequence[Batch] | None = None, **position: int) -> StepContext:
    """A StepContext for a method stepped outside the harness: `optimizer()` (no schedule; called
    again by reset_optimizer), `batches` as the training split, `val` (if given) as the
    validation split, and the position in the run."""
    passes = {} if val is None else {"val_batches": lambda: iter(val)}
    return StepContext(lambda: (optimizer(), None), lambda: iter(batches), **passes, **position)


TIMING_KEYS = ("seconds", "hook_seconds", "samples_per_s")


def without_timing(records: Sequence[dict]) -> list[dict]:
    """metrics.jsonl records minus wall-clock fields, which legitimately differ between runs."""
    return [{**r, "train": {k: v for k, v in r["train"].items() if k not in TIMING_KEYS}} for r in records]


def assert_resumes_exactly(cfg: RunConfig, store: Store, tmp_path, monkeypatch, at_epoch: int = 2) -> None:
    """`cfg` interrupted as epoch `at_epoch` starts, then resumed, ends with the metrics and
    summary of an uninterrupted run of it (in a store of its own under `tmp_path`)."""
    from mmbalance.bench.store import RunDir
    from mmbalance.bench.train import run

    reference = run(cfg, Store(tmp_path / "ref"))
    run_interrupted(cfg, store, monkeypatch, at_epoch=at_epoch)
    resumed = run(cfg, store)
    rd = store.run_dir(cfg.group, cfg.run_id())
    assert without_timing(rd.read_metrics()) == without_timing(RunDir(reference.path).read_metrics())
    for key in ("best_val", "best_test", "last", "probes"):
        assert resumed.summary[key] == reference.summary[key]


def run_interrupted(cfg: RunConfig, store: Store, monkeypatch, at_epoch: int) -> None:
    """Run `cfg` into `store` until a KeyboardInterrupt stops it as epoch `at_epoch` starts
    training (epochs before it are complete and checkpointed); running it again resumes."""
    from mmbalance.bench.train import Trainer, run

    original = Trainer.train_epoch

    def interrupt(self, epoch):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, store)
    monkeypatch.setattr(Trainer, "train_epoch", original)


def mlp_setup(names: Sequence[str], classes: int, *, in_dims: int | dict[str, int] = 5,
              dims: int | dict[str, int] = 6, hidden: int = 8, fusion: str = "concat", epochs: int = 1,
              seed: int = 0, encoder: Callable[[Modality], torch.nn.Module] | None = None) -> MethodSetup:
    """The method tests' tiny models: one MLP encoder per vector modality (`in_dims` inputs,
    `hidden` units, `dims` features; a number is every modality's), built after
    torch.manual_seed(seed) in the modalities' order; `encoder` builds another encoder instead."""
    import torch.nn as nn

    from mmbalance.models.small import MLPEncoder, MLPParams

    def per(value: int | dict[str, int], m: str) -> int:
        return value[m] if isinstance(value, dict) else value

    torch.manual_seed(seed)
    mods = tuple(Modality(m, "vector", (per(in_dims, m),)) for m in names)
    build = encoder or (lambda m: MLPEncoder(MLPParams(hidden=hidden, out_dim=per(dims, m.name)), m))
    return MethodSetup(nn.ModuleDict({m.name: build(m) for m in mods}), classes, mods, fusion=fusion, epochs=epochs)


def largest_difference(pairs) -> float:
    """max |a - b| over every parameter and buffer of (suite module, reference module) pairs whose
    state_dicts list the same tensors in the same order."""
    return max((a - b).abs().max().item() for x, y in pairs
               for a, b in zip(x.state_dict().values(), y.state_dict().values(), strict=True))


class BNEncoder(torch.nn.Module):
    """Linear -> BatchNorm -> activation, `out_dim` = d_out: the method tests' encoder whose train
    and eval modes differ (a prototype, diagnosis or teacher pass must pick the right one)."""

    def __init__(self, d_in: int, d_out: int = 4, *, bias: bool = True,
                 activation: type[torch.nn.Module] = torch.nn.ReLU) -> None:
        super().__init__()
        self.out_dim = d_out
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=bias), torch.nn.BatchNorm1d(d_out),
                                       activation())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
