"""The base of every registered class's typed Params (methods, datasets, encoders) and of the
harness's own config sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoParams(Strict):
    """Params of a class that takes none."""


class Window(Strict):
    """The epochs in which a method's mechanism acts, `modulation_starts <= epoch <= modulation_ends`
    (inclusive, 0-based; `modulation_ends: null` = to the end of training), as the reference codes
    (and BalanceBenchmark's trainers) gate them; outside it a method trains as its base does. A
    method's Params derive from it and redeclare a field where its reference's default differs."""

    modulation_starts: int = Field(0, ge=0)
    modulation_ends: int | None = Field(None, ge=0)  # None: to the end of training

    @model_validator(mode="after")
    def _window_opens(self) -> Window:
        if self.modulation_ends is not None and self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends={self.modulation_ends} is before modulation_starts="
                             f"{self.modulation_starts}: the window (inclusive) would never open")
        return self

    def in_window(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch and (self.modulation_ends is None or epoch <= self.modulation_ends)


TUNE_KEY = "tune"  # a Field's json_schema_extra key that holds its search range


class Range(Strict):
    """A tunable parameter's search range: [low, high], sampled on a log scale where `log`; an int
    field (`integer`) samples integers. `when`: searched only in configs where each named field has
    one of the listed values (a coefficient that only one strategy or schedule reads)."""

    low: float
    high: float
    log: bool = False
    integer: bool = False
    when: dict[str, list[Any]] = Field(default_factory=dict)

    def applies(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"a search range needs low < high; got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale search range needs low > 0; got low={self.low}")
        return self


def tunable(default: float | int | None, low: float, high: float, *, log: bool = False,
            when: Mapping[str, Any] | None = None, **field: Any) -> Any:
    """A Params field that `mmbalance tune` searches over [low, high] (on a log scale where `log`);
    `when` {field: value or list of values}: only in configs where those fields have those values;
    `field`: the usual pydantic Field constraints (ge, le, ...). The default must lie in the range,
    or be None (the variant's own rule; a tuned value replaces it). An int default samples integers."""
    conditions = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in (when or {}).items()}
    spec = Range(low=low, high=high, log=log, integer=isinstance(default, int) and not isinstance(default, bool),
                 when=conditions)
    if default is not None and not low <= default <= high:
        raise ValueError(f"tunable default {default} lies outside its search range [{low}, {high}]")
    return Field(default, json_schema_extra={TUNE_KEY: spec.model_dump()}, **field)


def search_space(params: type[BaseModel], values: Mapping[str, Any] | None = None) -> dict[str, Range]:
    """The tunable fields of a Params class (those declared with `tunable`) and their ranges; with
    `values` (a config's resolved params), only those its `when` conditions admit."""
    space = {}
    for name, info in params.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and TUNE_KEY in extra:
            space[name] = Range.model_validate(extra[TUNE_KEY])
    unknown = {key for r in space.values() for key in r.when} - set(params.model_fields)
    if unknown:  # a typo in a method file: say so rather than never search the field
        raise ValueError(f"{params.__name__}: a search range's `when` names {sorted(unknown)}, not fields of it")
    return {k: r for k, r in space.items() if values is None or r.applies(values)}
