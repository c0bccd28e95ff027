"""The dataset contract: named modalities, classes, and train/val/test splits.

A dataset is one class registered with ``@DATASETS.register(name)``. It declares its modality
names at class level (configs are validated before anything is loaded) and builds its splits
from its typed ``Params``. Splits that fit in memory are ``TensorSplit``s, which the harness
batches without a DataLoader; others are any ``torch.utils.data.Dataset`` returning
``(inputs: dict[str, Tensor], label: int)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from mmbalance.core.errors import DataError
from mmbalance.core.params import NoParams
from mmbalance.core.types import Modality

SPLITS = ("train", "val", "test")


class TensorSplit(torch.utils.data.Dataset):
    """A split held in memory: one tensor per modality plus labels, all of the same length."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        lengths = {m: len(t) for m, t in inputs.items()}
        if any(n != len(labels) for n in lengths.values()):
            raise ValueError(f"modality lengths {lengths} differ from {len(labels)} labels")
        self.inputs = inputs
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        return {m: t[i] for m, t in self.inputs.items()}, int(self.labels[i])


class Dataset(ABC):
    """Base class of every dataset; subclasses set the class variables and implement `split`."""

    Params: ClassVar[type[BaseModel]] = NoParams
    MODALITIES: ClassVar[tuple[str, ...]] = ()
    # modality -> encoder section used when the config names none for it
    DEFAULT_ENCODERS: ClassVar[dict[str, dict[str, Any]]] = {}
    registry_name: ClassVar[str]

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    @classmethod
    def modality_names(cls, params: BaseModel | None = None) -> tuple[str, ...]:
        """The modality names, known before any data is loaded (datasets whose modalities depend
        on their params, like `manifest`, read them from `params`)."""
        return cls.MODALITIES

    @classmethod
    def resolve_params(cls, params: BaseModel, origin_of: Callable[[str], str]) -> BaseModel:
        """`params` with what the data decides filled in and checked, before any training (the
        `manifest` dataset's pipeline options come from its cache). `origin_of(dotted key)` says
        where a config value came from, for error messages."""
        return params

    @classmethod
    def default_encoder(cls, modality: str, params: BaseModel | None = None) -> dict[str, Any]:
        """The encoder section used when the config names none for `modality` (`params`: the
        validated dataset params, for datasets whose modalities come from their data)."""
        return dict(cls.DEFAULT_ENCODERS.get(modality, {"name": "mlp"}))

    @property
    @abstractmethod
    def modalities(self) -> tuple[Modality, ...]:
        """Specs (with shapes) of the modalities, in the order of MODALITIES."""

    @property
    @abstractmethod
    def class_names(self) -> tuple[str, ...]: ...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def split(self, name: str) -> torch.utils.data.Dataset:
        """The split `name` (one of SPLITS)."""

    def checked_split(self, name: str) -> torch.utils.data.Dataset:
        """`split(name)`, refusing an empty one with a message that names the dataset and split."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        data = self.split(name)
        if len(data) == 0:
            raise DataError(f"dataset {self.registry_name!r}: split {name!r} is empty ({self.describe()})")
        return data

    def loader_split(self, name: str, *, augment: bool,
                     on_device: bool) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
        """What the harness batches for split `name`, and per modality the batch half of its view,
        which the harness runs on the training device (datasets.batch_views).

        `augment`: the training views (random crops...) rather than the test-time ones; the
        harness asks for the train split without them for probes. `on_device`: split each view
        that has a batch half. Datasets held in memory have no views: their splits come as they
        are, and the dict is empty.
        """
        return self.checked_split(name), {}

    def describe(self) -> str:
        return f"{self.registry_name} {self.params.model_dump()}"


def require_dir(path: str | Path | None, dataset: str, key: str = "dataset.root") -> Path:
    """The data directory of a dataset that reads files, or a DataError that says what to set."""
    if path is None:
        raise DataError(f"dataset {dataset!r} needs a data directory: set {key}=/path/to/data")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"dataset {dataset!r}: data directory {str(p)!r} (from {key}) does not exist")
    return p
