"""How the commands end: one message and an exit code a job scheduler can read, never a traceback
for a problem the user can fix.

exit 0 finished; 2 run-file / input problem (nothing was started); 1 failure during the work (what
was kept is said); 130 / 143 stopped by SIGINT / SIGTERM after saving what was done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from crepa.config import ConfigError

EXIT_CONFIG = 2
EXIT_FAILURE = 1
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def fail(console: Console, label: str, message: str, code: int) -> None:
    """Print ``label: message`` (no wrapping inside paths) and exit with ``code``."""
    console.print(f"[red]{label}:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(console: Console) -> Iterator[None]:
    """Turn a :class:`ConfigError` into its message and exit 2."""
    try:
        yield
    except ConfigError as error:
        fail(console, "error", str(error), EXIT_CONFIG)
