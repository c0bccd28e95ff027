"""Where the suite's log records go. Every module logs to `logging.getLogger(__name__)` (all under
the `mmbalance` logger) and configures nothing: used as a library, the suite says nothing below
WARNING unless the caller sets logging up. The processes the suite starts (the `mmbalance`
command, and a SLURM array task) show its records on stderr for as long as they run (`to_stderr`):
stdout keeps what a command exists to produce (tables, `status`, `show-config`), so that it can be
piped or redirected clean, and the progress lines share stderr with the tqdm bars.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

LOGGER = "mmbalance"


class LevelPrefix(logging.Formatter):
    """INFO as the bare message (progress lines); other levels prefixed: 'warning: ...', 'debug: ...'."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


class StderrHandler(logging.Handler):
    """Writes each record to sys.stderr as it is when the record comes (as logging.lastResort
    does: a stream swapped since, pytest's capture say, is followed), through tqdm.write, which
    clears a progress bar on the terminal and redraws it below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


@contextmanager
def to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """The suite's records of `level` and above on stderr for the block; afterwards the logger is
    as it was (a command run in-process, by a test or a notebook, leaves nothing installed)."""
    logger = logging.getLogger(LOGGER)
    handler = StderrHandler()
    handler.setFormatter(LevelPrefix())
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def verbose() -> bool:
    return logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG)


def child_level() -> int:
    """The level of a process this one starts (a SLURM task): DEBUG when this one logs DEBUG (-v),
    else INFO. Never quieter: a child's output goes to its log file, which -q does not cut short."""
    return logging.DEBUG if verbose() else logging.INFO


def child_flags() -> list[str]:
    """The same for a `python -m mmbalance` child process: its global flags."""
    return ["-v"] if verbose() else []
