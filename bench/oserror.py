"""OS errors (disk full, quota, read-only or failing disk) as the user should see them: the OS's
own message and the file it concerns ("No space left on device: results/g/run/checkpoint.pt"),
never a library's wrapper of it, and an exit status that tells a launcher to stop starting runs.
"""

from __future__ import annotations

import os
from pathlib import Path

# exit status of a `run-one` process whose run failed with an OS error (sysexits' EX_IOERR):
# every other run writes to the same store, so the launcher starts no more of them
EXIT_OS_ERROR = 74


def naming(error: OSError, path: str | Path) -> OSError:
    """`error` (same errno, hence same subclass) naming `path`, the file a write was meant to
    produce: a failed write() or fsync() names no file, and a rename names the temp file."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))


def os_message(error: OSError) -> str:
    """'No space left on device: PATH' (the OS's text, then the file), or the error as it is."""
    if error.strerror and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    return error.strerror or str(error)


def os_cause(error: BaseException) -> OSError | None:
    """The OSError that `error` is or was raised from (a RunFailed whose cause is one), if any."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__
    return None
