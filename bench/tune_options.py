"""The `tune:` section of a sweep file (and the `mmbalance tune` flags over it): bench.tune's budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mmbalance.core.errors import ConfigError
from mmbalance.core.overrides import Sources, format_errors
from mmbalance.core.params import Range, Strict


class TuneOptions(Strict):
    """trials: the budget of every cell (the same for every method); lr_range: the optimiser's lr,
    searched on a log scale beside the method's declared parameters; parallel: a cell's trials in
    flight at once (None: 1 inline, the local launcher's workers shared by the cells, 4 on SLURM);
    the first `startup_trials` trials of a study are sampled at random, then TPE models them, and
    the median pruner compares trials once that many have finished, and prunes a trial only after
    `warmup_epochs` epochs (None: half of the cell's epochs, so that a slow start, a small lr's or a
    staged method's, is not mistaken for a bad configuration).

    schedule: when the driver asks for the next trials. `rounds`: once every trial in flight has
    ended, so each round's trials are asked from the same finished ones whatever order their runs
    end in (a rerun asks the same trials: reproducible). `asap` (inline and local launchers): as
    soon as one trial run ends, its cell's next trial starts on the freed worker; no worker waits
    for the slowest (or a pruned trial's) run of a round, but which trials are asked depends on
    which runs end first."""

    trials: int | None = Field(None, ge=1)  # None in a file: the command line must give --trials
    lr_range: tuple[float, float] = (1e-4, 1e-1)
    parallel: int | None = Field(None, ge=1)
    sampler_seed: int = 0
    startup_trials: int = Field(3, ge=0)
    warmup_epochs: int | None = Field(None, ge=0)
    schedule: Literal["rounds", "asap"] = "rounds"

    @model_validator(mode="after")
    def _lr_range(self) -> TuneOptions:
        try:
            Range(low=self.lr_range[0], high=self.lr_range[1], log=True)
        except ValidationError as e:
            why = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"lr_range {list(self.lr_range)}: {why}") from None
        return self

    def warmup(self, epochs: int) -> int:
        """The epochs a trial of `epochs` trains before the pruner may stop it."""
        return epochs // 2 if self.warmup_epochs is None else self.warmup_epochs

    def lr(self) -> Range:
        return Range(low=self.lr_range[0], high=self.lr_range[1], log=True)


def tune_options(from_file: TuneOptions | None, flags: dict[str, Any], origin: str = "the command line") -> TuneOptions:
    """The sweep file's `tune:` section with the command line's flags (those not None) over it; a bad
    value or a missing budget is one line naming the key and where it came from."""
    flags = {k: v for k, v in flags.items() if v is not None}
    sources = Sources()
    sources.record({f"tune.{k}": v for k, v in flags.items()}, origin)
    try:
        options = TuneOptions.model_validate({**(from_file or TuneOptions()).model_dump(exclude_unset=True), **flags})
    except ValidationError as e:
        raise ConfigError(format_errors(e, TuneOptions, sources, prefix="tune")) from None
    if options.trials is None:
        raise ConfigError("no tuning budget: give `--trials N` or `tune: {trials: N}` in the sweep file "
                          "(the trials every cell gets)")
    return options


def check_schedule(options: TuneOptions, launcher: str) -> None:
    """`schedule: asap` adds trials to a running launch, which a SLURM job array cannot take."""
    if options.schedule == "asap" and launcher == "slurm":
        raise ConfigError("tune.schedule: 'asap' needs the inline or local launcher; on slurm each round "
                          "of trials is one job array (schedule: rounds)")
