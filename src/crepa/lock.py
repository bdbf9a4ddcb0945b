"""One owner per output folder and per cache: a lock file holding the owner's pid, host and start.

``crepa train`` holds ``output.dir/.crepa.lock`` and ``crepa precompute`` holds ``cache.dir/.crepa.lock``
for as long as they run; a second run into the same folder refuses at once, naming the owner. A
lock whose owner is gone (same host, pid no longer running, or running but started later: a reused
pid) is stale and taken over; a lock from another host cannot be checked, so the message says how
to remove it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crepa.config import ConfigError

LOCK_NAME = ".crepa.lock"


class FolderLocked(ConfigError):
    """Another live run owns the folder."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the owner recorded in a lock on this host still runs."""
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def read_owner(folder: Path) -> dict[str, Any] | None:
    """The live owner of ``folder``'s lock, or None when it is free or stale."""
    path = folder / LOCK_NAME
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(owner, dict):
            raise ValueError
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # being written right now, or left half-written by a run killed while taking it
        try:
            recent = time.time() - path.stat().st_mtime < 5
        except OSError:
            return None
        return {"host": "?", "pid": "?"} if recent else None
    if owner.get("host") != socket.gethostname():
        return owner
    return owner if _alive(owner) else None


def _describe(owner: dict[str, Any]) -> str:
    since = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
    )
    return f"pid {owner.get('pid')} on host {owner.get('host')}, since {since}: {owner.get('command', '')}".rstrip(
        ": "
    )


@contextmanager
def hold(folder: Path, key: str, what: str) -> Iterator[None]:
    """Own ``folder`` (created if needed) while the block runs; raise :class:`FolderLocked` naming
    ``key`` (the run-file key of the folder) when a live run owns it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "process_start": _process_start(os.getpid()),
        "command": what,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = read_owner(folder)
            if owner is not None:
                remote = owner.get("host") != socket.gethostname()
                hint = (
                    f"if no crepa run is active on {owner.get('host')}, delete {path}"
                    if remote
                    else f"wait for it to finish, stop it, or choose another {key}"
                )
                raise FolderLocked(
                    f"{key}: {folder} is in use by another crepa run ({_describe(owner)}); {hint}"
                ) from None
            path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:  # pragma: no cover - three runs racing for one stale lock
        raise FolderLocked(f"{key}: {folder} is being taken by another crepa run; try again")
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def check_not_written(folder: Path, key: str) -> None:
    """Raise :class:`FolderLocked` when a live run (e.g. ``crepa precompute``) owns ``folder``."""
    owner = read_owner(folder)
    if owner is not None:
        raise FolderLocked(
            f"{key}: {folder} is being written by another crepa run ({_describe(owner)}); wait for it to finish"
        )
