"""The base of every registered class's typed Params (methods, datasets, encoders) and of the
harness's own config sections."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NoParams(Strict):
    """Params of a class that takes none."""
