"""What is registered, for `mmbalance list`: each class with its typed parameters and defaults."""

from __future__ import annotations

import sys

from pydantic import BaseModel

from mmbalance.core.registry import DATASETS, ENCODERS, METHODS


def params_line(params: type[BaseModel]) -> str:
    parts = []
    for name, field in params.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        parts.append(f"{name}={default}")
    return ", ".join(parts) or "(no parameters)"


def first_line(cls: type) -> str:
    """The first line of the class's docstring, else of its module's (a method's file says what it is)."""
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def option_lines(options: BaseModel, prefix: str = "") -> list[str]:
    """'key=value  what it does' for every option of a (nested) options model, dotted."""
    lines = []
    for name, field in type(options).model_fields.items():
        value = getattr(options, name)
        if isinstance(value, BaseModel):
            lines += option_lines(value, f"{prefix}{name}.")
        else:
            shown = list(value) if isinstance(value, tuple) else value
            lines.append(f"{prefix}{name}={shown!r}  {field.description or ''}".rstrip())
    return lines


def describe_registries() -> str:
    lines = ["methods:"]
    for name, cls in METHODS.items():
        family = getattr(cls, "family", "(no family)")
        lines += [f"  {name:<16} {first_line(cls)}", f"  {'':<16} family: {family}",
                  f"  {'':<16} params: {params_line(cls.Params)}"]
    lines.append("datasets:")
    for name, cls in DATASETS.items():
        modalities = ", ".join(cls.MODALITIES) or "(read from the prepared data)"
        lines += [f"  {name:<16} modalities: {modalities}", f"  {'':<16} params: {params_line(cls.Params)}"]
        presets = getattr(cls, "PRESETS", None)
        if presets:
            lines.append(f"  {'':<16} presets: {', '.join(presets)}")
        pipelines = getattr(cls, "PIPELINES", {})
        for pipe_name, pipe in pipelines.items():
            default = " (default)" if pipe_name == getattr(cls, "DEFAULT_PIPELINE", "") else ""
            lines.append(f"  {'':<16} pipeline {pipe_name}{default}: {pipe.description}")
        options = getattr(pipelines.get(getattr(cls, "DEFAULT_PIPELINE", "")), "options", None)
        if isinstance(options, BaseModel):
            lines.append(f"  {'':<16} pipeline options (prepare --set KEY=VALUE; the default preset's values):")
            lines += [f"  {'':<18} {line}" for line in option_lines(options)]
    lines.append("encoders:")
    for name, cls in ENCODERS.items():
        lines.append(f"  {name:<16} params: {params_line(cls.Params)}")
    lines.append("fusions (model.fusion): concat, sum, film, gated, late")
    return "\n".join(lines)
