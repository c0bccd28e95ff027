"""The results store: results/<group>/<run id>/ with config, metrics, summary, checkpoints, status.

Every write goes to a temporary file in the same directory and is renamed over the target, so a
run killed at any moment leaves either the old or the new file, never half of one. Reports read
only this store.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.cancel import guarded
from bench.errors import StoreError
from bench.oserror import naming

STATES = ("pending", "running", "finished", "failed", "interrupted")
# where and how a launcher placed the run: kept across the run's own status updates
PLACEMENT_KEYS = ("job_id", "log", "stdout", "restarts")
# file paths in status.json: stored relative to the store root, so that a copied store names its own
STORE_PATH_KEYS = ("log", "stdout")


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); results and reports are read by others too
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk names the file it could not write, not the temp file
            raise naming(e, path) from e
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, strict_json(data, indent=2) + "\n")


def strict_json(data: Any, **options: Any) -> str:
    """JSON that every strict reader parses: a non-finite float (a NaN loss, an undefined metric)
    is written as null, never as the bare NaN/Infinity tokens Python's json emits by default."""
    return json.dumps(finite_or_none(data), allow_nan=False, **options)


def finite_or_none(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


class RunDir:
    """One run's directory and the files in it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.status_file = self.path / "status.json"
        self.checkpoint = self.path / "checkpoint.pt"  # state after the last finished epoch
        self.best = self.path / "best.pt"  # model weights at the best validation epoch

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---- config
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config.read_text())

    # ---- status
    def status(self) -> dict[str, Any]:
        if not self.status_file.exists():
            return {"state": "new"}
        return json.loads(self.status_file.read_text())

    @guarded  # one writer at a time; a cancelled job's own writes are refused (bench.cancel)
    def set_status(self, state: str, **info: Any) -> None:
        """Replace the status record. A launcher's placement (job id, log paths) is carried
        over from the previous record unless `info` sets it; a None in `info` drops a key."""
        assert state in STATES, state
        previous = self.status()
        info = {k: self.store_relative(v) if k in STORE_PATH_KEYS and v is not None else v for k, v in info.items()}
        record = {
            "state": state,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **{k: previous[k] for k in PLACEMENT_KEYS if k in previous},
            **info,
        }
        atomic_write_json(self.status_file, {k: v for k, v in record.items() if v is not None})

    # ---- per-epoch metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.metrics, "".join(strict_json(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        # rewriting the (small) file keeps the append atomic
        self.write_metrics(self.read_metrics() + [record])

    # ---- summary and checkpoints
    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary, summary)

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary.read_text()) if self.summary.exists() else None

    def save(self, path: Path, state: dict[str, Any]) -> None:
        # serialised in memory first: torch.save writing to a full disk raises its own
        # RuntimeError ("enforce fail at inline_container.cc"); a plain write raises the OSError
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(path, lambda f: f.write(buffer.getbuffer()), mode="wb")

    def load(self, path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=False)

    # ---- paths recorded in status.json (STORE_PATH_KEYS)
    @property
    def store_root(self) -> Path:
        return self.path.parent.parent  # <root>/<group>/<run id>

    def store_relative(self, path: str | Path) -> str:
        """`path` relative to the store root where it lies inside the store, else as given."""
        try:
            return str(Path(path).resolve().relative_to(self.store_root.resolve()))
        except ValueError:
            return str(path)

    def resolve(self, recorded: str) -> Path:
        """A path from status.json as a path here: relative ones are in this run's store."""
        return self.store_root / recorded if not Path(recorded).is_absolute() else Path(recorded)


class Store:
    """The root of all results: `root/<group>/<run id>/`."""

    def __init__(self, root: str | Path = "results") -> None:
        self.root = Path(root)

    def ensure_writable(self) -> Store:
        """Check, without creating anything, that the root is (or can be made) a writable
        directory, so that a bad `--results` stops with one line naming the path and the reason
        before any run starts."""
        def refuse(cause: str) -> StoreError:
            return StoreError(f"results store {str(self.root)!r} cannot be written: {cause}; "
                              "choose another with --results DIR")

        existing = next(p for p in (self.root, *self.root.absolute().parents) if p.exists())
        if not existing.is_dir():
            where = "it is" if existing == self.root else f"{str(existing)!r} is"
            raise refuse(f"{where} a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise refuse(f"{'it' if existing == self.root else repr(str(existing))} is not writable by this user")
        return self

    def run_dir(self, group: str, run_id: str) -> RunDir:
        return RunDir(self.root / group / run_id)

    def runs(self, group: str | None = None) -> Iterator[RunDir]:
        """Every run directory (one holding config.yaml), in a group or in all groups."""
        pattern = f"{group}/*/config.yaml" if group else "*/*/config.yaml"
        for config in sorted(self.root.glob(pattern)):
            yield RunDir(config.parent)
