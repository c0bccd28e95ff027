"""The results schema: what a run's files in the store may hold.

bench.store parses each file and checks it here; a file that breaks a rule is damaged
(DamagedFile: the file and the first rule it breaks, in one line), so that no reader goes on
with half a record and no report shows a value no run can have. The rules:

- accuracies, macro-F1, mAP (fused, per modality, probes) are in [0, 1] or null (null: undefined;
  the store writes a NaN as null);
- metrics.jsonl holds one record per epoch, epochs 0, 1, 2, ... in order; every epoch named in
  summary.json, checkpoint.pt or best.pt is in [0, epochs);
- status.json's state is one of bench.store.STATES, with 0 <= epochs_done <= epochs;
- config.yaml names its dataset and method and gives train.seed and train.epochs >= 1;
- a key a reader needs is present, with the type it needs (extra keys are allowed: later versions
  of the suite may add some).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveInt, ValidationError

from mmbalance.core.errors import DamagedFile

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Unit = Rate | None  # a rate; None: undefined
Amount = NonNegativeFloat | None
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "counters")


class Record(BaseModel):
    # strict: a string where a number belongs is damage, not something to convert
    model_config = ConfigDict(strict=True, extra="allow")


class Scores(Record):
    acc: Unit
    macro_f1: Unit = None
    map: Unit = None
    loss: float | None = None
    modality_acc: dict[str, Unit] = {}


class Epoch(Record):
    """One line of metrics.jsonl."""

    epoch: NonNegativeInt
    train: dict[str, float | None] = {}
    val: Scores
    test: Scores
    selectable: bool = True


class Picked(Record):
    epoch: NonNegativeInt
    val: Scores | None = None  # no reader needs it
    test: Scores


class Probe(Record):
    train_acc: Unit = None
    val_acc: Unit = None
    test_acc: Unit


class Cost(Record):
    device: str = "cpu"
    seconds_per_epoch: Amount = None
    samples_per_s: Amount = None
    forward_passes_per_step: Amount = None
    backward_passes_per_step: Amount = None
    peak_gpu_mem_mb: Amount = None
    peak_rss_mb: Amount = None
    threads: PositiveInt | None = None  # torch's intra-op threads (bench.threads)
    checkpoints: NonNegativeInt | None = None  # written by the process that finished the run
    checkpoint_s: Amount = None  # their seconds


class Summary(Record):
    epochs: PositiveInt
    best_val: Picked
    best_test: Picked
    last: Picked
    probes: dict[str, Probe] = {}
    cost: Cost = Cost()


class Damage(Record):
    """An entry of status.json's `damaged` list: a file found damaged and kept aside."""

    file: str
    kept_as: str
    why: str


class Status(Record):
    state: str
    epochs_done: NonNegativeInt | None = None
    epochs: PositiveInt | None = None
    pid: int | None = None
    job_id: str | int | None = None
    error: str | None = None
    restarts: NonNegativeInt | None = None
    damaged: list[Damage] = []


class Named(Record):
    name: str


class TrainSection(Record):
    seed: int
    epochs: PositiveInt


class ModelSection(Record):
    fusion: str | None = None


class EvalSection(Record):
    select_metric: str = "acc"


class StoredConfig(Record):
    label: str | None = None
    dataset: Named
    method: Named
    train: TrainSection
    model: ModelSection = ModelSection()
    eval: EvalSection = EvalSection()


class RobustnessEntry(Record):
    zeroed: Rate
    noise: dict[str, Rate] = Field(min_length=1)


class Robustness(Record):
    """robustness.json (bench.robustness): each modality's accuracy zeroed and per noise level."""

    clean: Rate
    modalities: dict[str, RobustnessEntry] = Field(min_length=1)


def check(model: type[Record], data: Any, path: Path, where: str = "") -> Record:
    """`data` validated against `model`; DamagedFile naming the first broken rule otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise DamagedFile(path, where + first_error(e)) from None


def first_error(error: ValidationError) -> str:
    """'best_val.test.acc is 9.5: input should be less than or equal to 1' (or 'is missing')."""
    item = error.errors()[0]
    key = ".".join(str(p) for p in item["loc"]) or "the file"
    if item["type"] == "missing":
        return f"wrong shape: {key} is missing"
    what = "wrong shape" if item["type"].endswith("_type") else "value out of range"
    return f"{what}: {key} is {short(item.get('input'))}: {item['msg'][0].lower()}{item['msg'][1:]}"


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_status(data: Any, path: Path) -> dict[str, Any]:
    from mmbalance.bench.store import STATES

    status = check(Status, data, path)
    if status.state not in STATES:
        raise DamagedFile(path, f"value out of range: state is {status.state!r}, not one of {', '.join(STATES)}")
    if status.epochs_done is not None and status.epochs is not None and status.epochs_done > status.epochs:
        raise DamagedFile(path, f"value out of range: epochs_done {status.epochs_done} > epochs {status.epochs}")
    return data


def check_config(data: Any, path: Path) -> dict[str, Any]:
    check(StoredConfig, data, path)
    return data


def check_metrics(records: Sequence[Any], path: Path) -> list[dict[str, Any]]:
    """Each line an Epoch; epochs 0, 1, 2, ... in order (line n holds epoch n - 1)."""
    for n, record in enumerate(records):
        epoch = check(Epoch, record, path, f"line {n + 1}: ").epoch
        if epoch != n:
            raise DamagedFile(path, f"line {n + 1}: epochs out of order: epoch {epoch} where {n} was expected "
                                    "(one line per epoch, from 0)")
    return list(records)


def check_robustness(data: Any, path: Path) -> dict[str, Any]:
    check(Robustness, data, path)
    bad = [level for entry in data["modalities"].values() for level in entry["noise"] if not is_level(level)]
    if bad:
        raise DamagedFile(path, f"value out of range: noise level {bad[0]!r} is not a number >= 0")
    return data


def is_level(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def check_summary(data: Any, path: Path) -> dict[str, Any]:
    summary = check(Summary, data, path)
    for block in ("best_val", "best_test", "last"):
        epoch = getattr(summary, block).epoch
        if epoch >= summary.epochs:
            raise DamagedFile(path, f"value out of range: {block}.epoch is {epoch}, past the run's "
                                    f"{summary.epochs} epochs (0..{summary.epochs - 1})")
    return data


def check_checkpoint(state: Any, path: Path, epochs: int, keys: Sequence[str] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """A checkpoint.pt (or, with keys ('epoch', 'model'), a best.pt) of a run of `epochs` epochs;
    its metrics history, where it holds one, has one record per epoch up to its own."""
    if not isinstance(state, dict) or any(k not in state for k in keys):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise DamagedFile(path, f"wrong shape: not a checkpoint of this suite (needs {', '.join(keys)}; found {found})")
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise DamagedFile(path, f"value out of range: epoch is {epoch!r}, not in 0..{epochs - 1}")
    if state.get("history") is not None:
        check_metrics(state["history"], path)
        if len(state["history"]) != epoch + 1:
            raise DamagedFile(path, f"wrong shape: its history holds {len(state['history'])} epochs, "
                                    f"not the {epoch + 1} up to its epoch {epoch}")
    return state
