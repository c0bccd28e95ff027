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
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from mmbalance.bench import schema
from mmbalance.bench.cancel import guarded
from mmbalance.bench.oserror import naming
from mmbalance.core.errors import ConfigError, DamagedFile, StoreError

STATES = ("pending", "running", "finished", "failed", "interrupted", "pruned")  # pruned: a tuning trial (bench.trial)
# where and how a launcher placed the run: kept across the run's own status updates
PLACEMENT_KEYS = ("job_id", "log", "stdout", "restarts")
# file paths in status.json: stored relative to the store root, so that a copied store names its own
STORE_PATH_KEYS = ("log", "stdout")
# what happened to the run's files (the damaged ones kept aside): kept across status updates
HISTORY_KEYS = ("damaged",)
# libyaml's parser where PyYAML has it (its wheels do): `status` and `report` read every run's
# config.yaml, and the pure-Python parser took ~2.5 ms of a 120-node file (8 s for 1,000 runs)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def write_checked(path: Path, text: str, check: Callable[[Any, Path], Any], parse: Callable[[str], Any]) -> None:
    """Write `text` only if the readers will accept it: parsed back and checked against the same
    schema they use (bench.schema), so that the writer cannot leave a file every reader calls
    damaged. A refusal is a bug of the suite or of a method (e.g. an accuracy above 1) and names
    the file and the field; the file keeps what it held."""
    try:
        check(parse(text), path)
    except DamagedFile as e:
        raise StoreError(f"not writing {path}: {e.why}") from None
    atomic_write_text(path, text)


def jsonl(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
        # a new best.pt, written with the checkpoint that selects it and then renamed over best.pt
        self.best_next = self.path / "best.pt.next"
        # the selected weights under missing and noised modalities (bench.robustness), when evaluated
        self.robustness = self.path / "robustness.json"

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---- config
    def write_config(self, config: dict[str, Any]) -> None:
        # not checked here: the harness writes it from a validated RunConfig, whose types are stricter
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        text = read_text(self.config)
        try:
            data = yaml.load(text, Loader=YAML_LOADER)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise DamagedFile(self.config, f"not YAML{at}: {getattr(e, 'problem', None) or e}") from None
        return schema.check_config(data, self.config)

    # ---- status
    def status(self) -> dict[str, Any]:
        if not self.status_file.exists():
            return {"state": "new"}
        return schema.check_status(parse_json(read_text(self.status_file), self.status_file), self.status_file)

    def recorded_status(self) -> dict[str, Any]:
        """status(), or {'state': 'damaged', 'error': why} when status.json is damaged."""
        try:
            return self.status()
        except DamagedFile as e:
            return {"state": "damaged", "error": str(e)}

    @guarded  # one writer at a time; a cancelled job's own writes are refused (bench.cancel)
    def set_status(self, state: str, **info: Any) -> None:
        """Replace the status record. A launcher's placement (job id, log paths) is carried
        over from the previous record unless `info` sets it; a None in `info` drops a key."""
        assert state in STATES, state
        previous = self.previous_status()
        info = {k: self.store_relative(v) if k in STORE_PATH_KEYS and v is not None else v for k, v in info.items()}
        record = {
            "state": state,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **{k: previous[k] for k in PLACEMENT_KEYS if k in previous},
            **{k: previous[k] for k in HISTORY_KEYS if k in previous},
            **info,
        }
        text = strict_json({k: v for k, v in record.items() if v is not None}, indent=2) + "\n"
        write_checked(self.status_file, text, schema.check_status, json.loads)

    def previous_status(self) -> dict[str, Any]:
        """The record a status update starts from: a damaged status.json is kept aside, and the
        new record lists it under `damaged`."""
        try:
            return self.status()
        except DamagedFile as e:
            return {"damaged": [self.set_aside(e)]}

    # ---- per-epoch metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists() or self.metrics.stat().st_size == 0:  # a run that has no epoch yet
            return []
        lines = read_text(self.metrics).splitlines()
        records = [parse_json(line, self.metrics, n + 1) for n, line in enumerate(lines) if line.strip()]
        return schema.check_metrics(records, self.metrics)

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_checked(self.metrics, "".join(strict_json(r) + "\n" for r in records), schema.check_metrics, jsonl)

    # ---- summary and checkpoints
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_checked(self.summary, strict_json(summary, indent=2) + "\n", schema.check_summary, json.loads)

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary.exists():
            return None
        return schema.check_summary(parse_json(read_text(self.summary), self.summary), self.summary)

    def read_robustness(self) -> dict[str, Any] | None:
        if not self.robustness.exists():
            return None
        return schema.check_robustness(parse_json(read_text(self.robustness), self.robustness), self.robustness)

    def save(self, path: Path, state: dict[str, Any]) -> None:
        # serialised in memory first: torch.save writing to a full disk raises its own
        # RuntimeError ("enforce fail at inline_container.cc"); a plain write raises the OSError
        import torch  # here, not at the top: `mmbalance status` reads the store without torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(path, lambda f: f.write(buffer.getbuffer()), mode="wb")

    def load(self, path: Path) -> dict[str, Any]:
        """A checkpoint; DamagedFile naming it when torch cannot read it (empty, truncated, garbage)."""
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as e:
            if path.exists() and path.stat().st_size == 0:
                raise DamagedFile(path, "empty") from e
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DamagedFile(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from e

    # ---- damaged files
    def damage(self) -> DamagedFile | None:
        """The first damaged record of the run, or None."""
        return next(iter(self.damaged()), None)

    def damaged(self) -> list[DamagedFile]:
        """The damaged records of the run (config.yaml, status.json, metrics.jsonl, summary.json).
        Checkpoints are not read here; see checkpoint_damage."""
        found, records = [], {}
        for path, read in ((self.config, self.read_config), (self.status_file, self.status),
                           (self.metrics, self.read_metrics), (self.summary, self.read_summary)):
            try:
                records[path] = read() if path.exists() else None
            except DamagedFile as e:
                found.append(e)
        # metrics.jsonl gets an epoch's line before checkpoint.pt and status.json count the epoch
        done = (records.get(self.status_file) or {}).get("epochs_done") or 0
        n = len(records.get(self.metrics) or [])
        if records.get(self.metrics) is not None or self.metrics.exists() and self.metrics in records:
            if n < done:
                found.append(DamagedFile(self.metrics, f"holds {n} epoch(s), but status.json records {done} "
                                                       "done (truncated or emptied?)"))
            elif n == 0 and self.checkpoint.exists():
                found.append(DamagedFile(self.metrics, "empty, but checkpoint.pt was written after an epoch"))
        return found

    def checkpoint_damage(self) -> DamagedFile | None:
        """A quick look, without loading them, at checkpoint.pt and best.pt: one that is empty or
        not the zip archive torch.save writes (truncated, overwritten) is damaged. Loading them
        (bench.train) checks the rest."""
        for path in (self.checkpoint, self.best):
            if path.exists() and not zipfile.is_zipfile(path):
                why = ("empty" if path.stat().st_size == 0
                       else "not a PyTorch checkpoint (no zip archive: truncated or overwritten)")
                return DamagedFile(path, why)
        return None

    def done(self) -> bool:
        """Finished, with readable records: nothing left to do. A finished run with a damaged
        record is not done: launching again rewrites its records from its checkpoint."""
        try:
            return self.status()["state"] == "finished" and self.summary.exists() and self.damage() is None
        except DamagedFile:
            return False

    def set_aside(self, damaged: DamagedFile) -> dict[str, str]:
        """Rename a damaged file to <name>.damaged-<UTC time> (kept for a look, never read again);
        returns the entry for status.json's `damaged` list."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = damaged.path.with_name(f"{damaged.path.name}.damaged-{stamp}")
        os.replace(damaged.path, kept)
        return {"file": damaged.path.name, "kept_as": kept.name, "why": damaged.why}

    def record_damage(self, *entries: dict[str, str]) -> None:
        """Add set_aside's entries to status.json's `damaged` list (the state stays as it is)."""
        status = self.status()
        state = status["state"] if status["state"] in STATES else "running"  # none recorded yet: it is being run
        self.set_status(state, damaged=[*status.get("damaged", []), *entries])

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


def read_text(path: Path) -> str:
    """The text of a record the store wrote; DamagedFile when it is empty or not UTF-8."""
    data = path.read_bytes()
    if not data.strip():
        raise DamagedFile(path, "empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFile(path, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); garbage?") from None


def parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """Strict JSON (no NaN/Infinity tokens: the store never writes them); DamagedFile naming
    the line otherwise (`line`: the line of a .jsonl file that `text` is)."""
    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not strict JSON")

    try:
        return json.loads(text, parse_constant=reject)
    except json.JSONDecodeError as e:
        at = f"line {line}, column {e.colno}" if line else f"line {e.lineno}, column {e.colno}"
        raise DamagedFile(path, f"not JSON at {at}: {e.msg}") from None
    except ValueError as e:
        raise DamagedFile(path, f"not JSON{f' at line {line}' if line else ''}: {e}") from None


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


def run_dirs(results_dir: Path) -> list[RunDir]:
    """The run directories of a group directory (`<root>/<group>`) or of a whole store root."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"results directory {results_dir} does not exist; give a group directory "
                          f"(results/<group>) or the store root (results)")
    configs = sorted(results_dir.glob("*/config.yaml")) or sorted(results_dir.glob("*/*/config.yaml"))
    return [RunDir(c.parent) for c in configs]
