"""The base of every registered class's typed Params (methods, datasets, encoders) and of the
harness's own config sections."""

from __future__ import annotations

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
