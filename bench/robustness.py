"""Robustness to missing or corrupted modalities at test time (MultiBench's robustness evaluation,
applied to imbalance): the selected checkpoint (best.pt) evaluated on the test split with one
modality at a time

- zeroed: its input replaced by zeros (at the input, the batch the method receives, after the
  loader's test-time views and normalisation: MultiBench's convention; the encoder still runs on
  the zeros, so a method's bias terms and normalisation statistics act as they would on a blank
  input), and
- corrupted at increasing levels: a float input gets x + level · std · N(0, 1), std the
  modality's input std over the clean test split (one number per modality); a token-id input
  (an integer tensor: datasets.text) cannot take Gaussian noise, so at level l each position is,
  with probability min(l, 1), replaced by an id drawn uniformly from the ids that occur in the
  modality's test split (its vocabulary as the split uses it: the encoder's own vocabulary is not
  known to the harness for every text encoder). Levels >= 1 replace every token.

Noise is drawn on the CPU from a generator seeded by (the run's seed, the modality's position,
the level's position), batch after batch of the in-order test pass, so the numbers are the same
on every call and device. Level 0 is the clean input: its accuracy is the run's test accuracy at
the selected epoch.

The result is robustness.json in the run's directory (atomic write, strict JSON):
{"split", "checkpoint", "epoch", "where", "seed", "levels", "clean": acc,
 "modalities": {m: {"corruption": "gaussian" | "token_replace", "std" | "ids", "zeroed": acc,
                    "noise": {level: acc}}}}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbalance.bench.evaluate import evaluate
from mmbalance.bench.store import RunDir, atomic_write_json, run_dirs
from mmbalance.core.errors import DamagedFile
from mmbalance.core.types import Batch
from mmbalance.methods.base import Method

log = logging.getLogger(__name__)

LEVELS = (0.0, 0.25, 0.5, 1.0, 2.0)
STREAM = 0x0B05  # with the run's seed, the random stream of the corruptions
WHERE = "input (the batch the method receives, after test-time views and normalisation)"

Batches = Callable[[], Iterable[Batch]]  # one in-order pass over the test split per call


@dataclass(frozen=True)
class Scale:
    """How one modality is corrupted: Gaussian noise of `std` (float input), or token ids
    replaced by draws from `ids` (integer input)."""

    std: float | None = None
    ids: torch.Tensor | None = None

    @property
    def corruption(self) -> str:
        return "gaussian" if self.ids is None else "token_replace"


def scales(batches: Batches) -> dict[str, Scale]:
    """Each modality's Scale over one clean pass: the std of a float input (float64 sums), the
    distinct ids of an integer one."""
    sums: dict[str, list[float]] = {}
    ids: dict[str, torch.Tensor] = {}
    for batch in batches():
        for m, x in batch.inputs.items():
            if x.is_floating_point():
                x = x.detach().double()
                s = sums.setdefault(m, [0.0, 0.0, 0])
                s[0] += float(x.sum())
                s[1] += float((x * x).sum())
                s[2] += x.numel()
            else:
                seen = torch.unique(x.detach().cpu())
                ids[m] = seen if m not in ids else torch.unique(torch.cat([ids[m], seen]))
    out = {m: Scale(ids=v) for m, v in ids.items()}
    for m, (total, squares, n) in sums.items():
        mean = total / n
        out[m] = Scale(std=float(np.sqrt(max(squares / n - mean * mean, 0.0))))
    return out


def generator(seed: int, modality_index: int, level_index: int) -> torch.Generator:
    """The CPU generator of one (modality, level): a function of these and the run's seed only."""
    entropy = np.random.default_rng([seed, STREAM, modality_index, level_index]).integers(2**62)
    return torch.Generator().manual_seed(int(entropy))


def corrupt(x: torch.Tensor, scale: Scale, level: float, gen: torch.Generator) -> torch.Tensor:
    """`x` at corruption `level` (drawn on the CPU from `gen`, then moved to x's device)."""
    if scale.ids is None:
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        return (x.float() + (level * scale.std) * noise.to(x.device)).to(x.dtype)
    replace = torch.rand(x.shape, generator=gen) < min(level, 1.0)
    drawn = scale.ids[torch.randint(len(scale.ids), x.shape, generator=gen)].to(x.dtype)
    return torch.where(replace.to(x.device), drawn.to(x.device), x)


def zeroed(batches: Batches, modality: str) -> Iterator[Batch]:
    """The pass with `modality`'s input replaced by zeros."""
    for batch in batches():
        yield Batch({**batch.inputs, modality: torch.zeros_like(batch.inputs[modality])}, batch.labels, batch.ids)


def corrupted(batches: Batches, modality: str, scale: Scale, level: float, gen: torch.Generator) -> Iterator[Batch]:
    """The pass with `modality`'s input at corruption `level`."""
    for batch in batches():
        x = corrupt(batch.inputs[modality], scale, level, gen)
        yield Batch({**batch.inputs, modality: x}, batch.labels, batch.ids)


def robustness(method: Method, batches: Batches, autocast, seed: int,
               levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """Fused test accuracy clean, with each modality zeroed, and at each corruption level."""
    acc = lambda passes: evaluate(method, passes, autocast).metrics["acc"]  # noqa: E731
    result: dict[str, Any] = {"where": WHERE, "seed": seed, "levels": [float(v) for v in levels],
                              "clean": acc(batches()), "modalities": {}}
    for i, (m, scale) in enumerate(sorted(scales(batches).items())):
        entry: dict[str, Any] = {"corruption": scale.corruption}
        if scale.ids is None:
            entry["std"] = scale.std
        else:
            entry["ids"] = len(scale.ids)
        entry["zeroed"] = acc(zeroed(batches, m))
        entry["noise"] = {str(float(level)): acc(corrupted(batches, m, scale, level, generator(seed, i, j)))
                          for j, level in enumerate(levels)}
        result["modalities"][m] = entry
    return result


# ------------------------------------------------------------------------ runs in the store


def evaluate_trained(trainer: Any, run_dir: RunDir, levels: Sequence[float] = LEVELS) -> dict[str, Any]:
    """Load best.pt into a bench.train.Trainer's method, evaluate its test split, write robustness.json."""
    best = run_dir.load(run_dir.best)
    trainer.method.load_state_dict(best["model"])
    result = {"split": "test", "checkpoint": "best.pt", "epoch": best["epoch"],
              **robustness(trainer.method, trainer.loaders["test"], trainer.context.autocast,
                           trainer.cfg.train.seed, levels)}
    atomic_write_json(run_dir.robustness, result)
    return result


def evaluate_run(run_dir: RunDir, force: bool = False, levels: Sequence[float] = LEVELS) -> str:
    """Evaluate one run of the store; the line the command prints for it."""
    # bench.train imports this module (eval.robustness at the end of a run): imported here, not above
    from mmbalance.bench.config import validate
    from mmbalance.bench.train import Trainer

    name = f"{run_dir.path.parent.name}/{run_dir.run_id}"
    state = run_dir.recorded_status().get("state")
    if state != "finished" or not run_dir.best.exists():
        return f"{name}: skipped ({state}, not finished with a best.pt)"
    again = ""
    if not force and run_dir.robustness.exists():
        try:
            run_dir.read_robustness()
            return f"{name}: skipped (evaluated already; --force evaluates again)"
        except DamagedFile as e:  # evaluated again: the file is rewritten whole
            again = f" (its robustness.json was damaged: {e.why}; evaluated again)"
    result = evaluate_trained(Trainer(validate(run_dir.read_config()), run_dir), run_dir, levels)
    zero = ", ".join(f"{m} zeroed {e['zeroed']:.3f}" for m, e in result["modalities"].items())
    return f"{name}: clean {result['clean']:.3f}; {zero}{again}"


def run_dirs_under(path: Path) -> list[RunDir]:
    """A run directory itself, or every run of a group directory or of the store root."""
    path = Path(path)
    return [RunDir(path)] if (path / "config.yaml").exists() else run_dirs(path)
