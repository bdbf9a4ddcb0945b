"""How the commands end: one message and an exit code a job scheduler can read, never a traceback
for a problem the user can fix.

exit 0 finished; 2 run-file / input problem (nothing was started); 1 failure during the work (the
message says what was kept); 130 / 143 stopped by SIGINT / SIGTERM after saving what was done; 3
``crepa plan`` answered that no memory setting fits (an answer, not a failure: scripts can tell it apart).
"""

from __future__ import annotations

import errno
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DOES_NOT_FIT = 3
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Writers implemented outside Python (safetensors, torch) report the OS error in their message only.
_MESSAGES = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks keep finished work."""

    signal = "SIGTERM"


@contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (a scheduler's stop keeps finished work)."""

    def raise_terminated(signum, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(console: Console, label: str, message: str, code: int) -> None:
    """Print ``label: message`` (no wrapping inside paths) and exit with ``code``."""
    console.print(f"[red]{label}:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def disk_problem(error: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when ``error`` (or its cause) is a disk-level write failure, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen.errno, seen.filename
        code = re.search(r"\bcode: (\d+)", str(seen))
        if code and int(code.group(1)) in DISK_ERRNOS:
            return int(code.group(1)), None
        for text, number in _MESSAGES.items():
            if text in str(seen):
                return number, None
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def command_errors(console: Console, state: Callable[[], tuple[Path | None, str]]) -> Iterator[None]:
    """Exit 2 for a :class:`ConfigError` or an unreachable model hub with the weights not cached
    (:class:`~crepa.models.hub.HubUnreachableError`: nothing was started); exit 1 with one line for a
    disk error; 130 for Ctrl-C.

    ``state()`` gives (the folder the command writes, what survives): the folder is named when the
    writer did not say which file failed."""
    from crepa.config import ConfigError
    from crepa.models.hub import HubUnreachableError

    try:
        yield
    except typer.Exit:
        raise
    except (ConfigError, HubUnreachableError) as error:
        fail(console, "error", str(error), EXIT_CONFIG)
    except KeyboardInterrupt as error:
        name = error.signal if isinstance(error, Terminated) else "SIGINT"
        fail(console, f"stopped by {name}", state()[1], EXIT_SIGNAL[name])
    except Exception as error:
        problem = disk_problem(error)
        if problem is None:
            raise
        number, path = problem
        folder, kept = state()
        fail(console, "cannot write", f"{path or folder}: {DISK_ERRNOS[number]}. {kept}", EXIT_FAILURE)
