"""Layered settings: YAML files and dotted `key=value` overrides merged into a mapping, validated
by a pydantic model, with every error naming the dotted key, where its value came from (a file,
an override) and what is allowed.

The run configs (bench.config) and the `manifest` dataset's pipeline options
(datasets.manifest_pipeline) are both read this way.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mmbalance.core.errors import ConfigError, allowed_list, closest


class Sources:
    """Remembers where each dotted key's value came from, for error messages."""

    def __init__(self) -> None:
        self._by_key: dict[str, str] = {}

    def record(self, data: Mapping[str, Any], origin: str, prefix: str = "") -> None:
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            self._by_key[dotted] = origin
            if isinstance(value, Mapping):
                self.record(value, origin, dotted + ".")

    def of(self, dotted: str) -> str:
        """The origin of `dotted`, else of the nearest key above it, else of a key below it
        (an override `a.b.c=1` is where section `a.b` came from)."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            origin = self._by_key.get(".".join(parts[:n]))
            if origin:
                return origin
        below = [origin for key, origin in self._by_key.items() if key.startswith(dotted + ".")]
        return below[-1] if below else "the defaults"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.strip().split("."), value


def assign(data: dict[str, Any], sources: Sources, dotted: str, value: Any, origin: str) -> None:
    """Set `data[a][b][c] = value` for dotted 'a.b.c' (creating sections) and record its origin."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value
    sources.record({dotted: value}, origin)


def apply_overrides(data: dict[str, Any], sources: Sources, overrides: Sequence[str], label: str = "override") -> None:
    """Each `key.sub=value` of `overrides` set in `data`; its origin reads `<label> 'key.sub=value'`."""
    for text in overrides:
        keys, value = parse_override(text)
        assign(data, sources, ".".join(keys), value, f"{label} {text!r}")


def read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'audio': {'bins': 64}} -> {'audio.bins': 64}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def format_errors(
    error: ValidationError, model: type[BaseModel], sources: Sources, prefix: str = "", what: str = "config"
) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        dotted = ".".join(([prefix] if prefix else []) + loc)
        origin = sources.of(dotted)
        if item["type"] == "extra_forbidden":
            allowed = allowed_keys(model, loc[:-1])
            lines.append(
                f"unknown key {dotted!r} (from {origin}){closest(loc[-1], allowed)}; "
                f"allowed keys here: {allowed_list(allowed)}"
            )
        elif isinstance(item.get("input"), Mapping):  # a check across a section's keys: the message names them
            lines.append(f"{dotted}: {item['msg']} (from {origin})")
        else:
            lines.append(f"{dotted}: {item['msg']} (got {item.get('input')!r}, from {origin})")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def allowed_keys(model: type[BaseModel], path: Sequence[str]) -> list[str]:
    """The field names of the (nested) model at `path`, or [] if it is not a model."""
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))
