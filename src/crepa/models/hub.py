"""One place that turns "the hub cannot be reached" into an error a user can act on, quickly.

Every command that loads weights by hub id (precompute, train, eval extractors, sample, export)
wraps the loading in :func:`hub_access`. Before the first hub id is loaded, one request with a short
timeout asks whether the hub endpoint (``HF_ENDPOINT``) answers; when it does not, huggingface_hub's
offline mode is switched on for the rest of the process, so diffusers and transformers read the
local cache only instead of retrying each file with backoff. When the files are neither reachable
(no network, firewall, ``HF_HUB_OFFLINE=1``) nor cached, the libraries raise an ``OSError`` that
blames the repository ("does not appear to have a file named model_index.json"); the wrapper raises
:class:`HubUnreachableError` naming the network, the id and the run-file key instead, and drops the
warnings the failed attempt printed (e.g. a deprecated-argument ``UserWarning`` between diffusers
and huggingface_hub) so that the error is the first thing the user reads.

Work that loads weights only at its end (``crepa experiment`` evaluates after training) checks them
first with :func:`check_loadable`, which reads the local cache only.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, get_session, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError

# Seconds the reachability request may take: long enough for a slow link, short enough to answer fast.
REACHABILITY_TIMEOUT_S = 3.0


class HubUnreachableError(RuntimeError):
    """The model hub cannot be reached and the weights are not cached; the message says what to do."""


class MissingLocalModelError(HubUnreachableError):
    """A value that is a local path (not a hub id) naming nothing on disk. A subclass of
    :class:`HubUnreachableError` so that every command reports it the same way (exit 2, one message)."""


# A hub id: "owner/name" (or a bare legacy "name"), letters, digits, "-", "_" and "." only.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_EXPECTED = {"model.pretrained": "a local diffusers pipeline folder or a hub id such as THUDM/CogVideoX-5b"}


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id: absolute, starting with ``./``,
    ``../`` or ``~``, or with a path separator but not of the form owner/name."""
    if name.startswith(("~", "./", "../")) or Path(name).is_absolute() or name in (".", ".."):
        return True
    return ("/" in name or os.sep in name) and not _HUB_ID.match(name)


def check_local_path(name: str, key: str) -> None:
    """Raise :class:`MissingLocalModelError` when ``name`` (run-file key ``key``) is a local path that
    does not exist: asking the hub for it would only report a failed download."""
    if looks_local(name) and not Path(name).expanduser().exists():
        expected = _EXPECTED.get(key, "an existing local folder or a hub id such as owner/name")
        raise MissingLocalModelError(f"{key}: {name} does not exist (give {expected})")


def unreachable_message(name: str, key: str) -> str:
    return (
        f"cannot reach the model hub and {name} is not in the local cache; download it first "
        f"(e.g. `hf download {name}` on a machine with network) or set {key} to a local folder"
    )


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub endpoint answers one HEAD request (any HTTP status counts), asked once per process.

    Goes through huggingface_hub's own HTTP session, so its proxy and certificate settings apply.
    """
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=REACHABILITY_TIMEOUT_S)
    except Exception:  # no response at all (refused, DNS, timeout, proxy): the transport's error types
        return False  # differ between huggingface_hub versions (httpx, httpx2)
    return True


def go_offline_unless_reachable(name: str) -> None:
    """For a hub id (not an existing folder): switch huggingface_hub to offline mode when the hub does
    not answer, so that loading reads the local cache at once instead of retrying the network."""
    if not Path(name).expanduser().exists() and not hub_reachable():
        constants.HF_HUB_OFFLINE = (
            True  # read at request time by huggingface_hub (diffusers' and transformers' downloads)
        )


@contextmanager
def hub_access(name: str, key: str) -> Iterator[None]:
    """Load ``name`` (hub id or folder, given by run-file key ``key``) inside this block.

    Warnings raised inside are held back and shown when the block ends, unless the block ends with
    :class:`HubUnreachableError` (they were about the failed download).
    A local path that does not exist raises :class:`MissingLocalModelError` before anything is loaded.
    """
    check_local_path(name, key)
    go_offline_unless_reachable(name)
    held: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as held:  # the filters in force still apply
            yield
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, LocalEntryNotFoundError):
                held.clear()
                raise HubUnreachableError(unreachable_message(name, key)) from None
            cause = cause.__cause__ or cause.__context__
        raise
    finally:
        for warning in held:
            warnings.showwarning(
                warning.message,
                warning.category,
                warning.filename,
                warning.lineno,
                warning.file,
                warning.line,
            )


def check_loadable(name: str, key: str, entry_file: str, revision: str | None = None) -> None:
    """Raise :class:`HubUnreachableError` now when hub id ``name`` will not load later: the hub does not
    answer and the local cache lacks ``entry_file``, the file its loading reads first (e.g. config.json).
    Downloads nothing; a folder, or a hub that answers, passes."""
    with hub_access(name, key):
        if constants.HF_HUB_OFFLINE and not Path(name).expanduser().exists():
            hf_hub_download(name, entry_file, revision=revision, local_files_only=True)
