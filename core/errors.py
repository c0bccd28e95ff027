"""Exceptions that carry a message a user can act on (what, where it came from, what is allowed)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

# exit status of a command stopped by Ctrl-C (the shells' 128 + SIGINT), without a traceback
EXIT_INTERRUPTED = 130
# exit status of `run-one` when another process holds the run's claim (sysexits' EX_TEMPFAIL):
# the run is left alone, which is not a failure
EXIT_ELSEWHERE = 75


class MMBalanceError(Exception):
    """Base class: an error whose message is meant for the user, printed without a traceback."""


class ConfigError(MMBalanceError):
    """A config key, type or name is wrong."""


class DataError(MMBalanceError):
    """A dataset directory, file or split is missing or unusable."""


class StoreError(MMBalanceError):
    """A results directory cannot be read or written (missing, not a directory, not writable)."""


class DamagedFile(StoreError):
    """A file of the results store cannot be read (empty, not UTF-8, not JSON, truncated) or holds
    what no run writes (a wrong shape, a value out of range). One line: the file, then why."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why

    def __reduce__(self):  # pickled across processes (submitit) with both arguments
        return type(self), (self.path, self.why)


class RunFailed(MMBalanceError):
    """A run stopped; its status file records the cause."""


class MMBalanceWarning(UserWarning):
    """Base class: a warning meant for the user; the CLI prints it as one 'warning: ...' line."""


class PluginWarning(MMBalanceWarning):
    """A third-party plugin could not be loaded; the rest of the suite works without it."""


class DataWarning(MMBalanceWarning):
    """Data that can be used but looks like a mistake (a class without training rows, a typo'd label)."""


def closest(value: str, allowed: Iterable[str]) -> str:
    """' (did you mean X?)' when one allowed value is close to `value`, else ''."""
    match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def allowed_list(allowed: Iterable[str]) -> str:
    return ", ".join(sorted(str(a) for a in allowed)) or "(none)"
