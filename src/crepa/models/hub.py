"""One place that turns "the hub cannot be reached" into an error a user can act on.

Every command that loads weights by hub id (precompute, train, eval extractors, sample) wraps the
loading in :func:`hub_access`. When the files are neither reachable (no network, firewall,
``HF_HUB_OFFLINE=1``) nor in the local cache, diffusers and transformers raise an ``OSError`` that
blames the repository ("does not appear to have a file named model_index.json"); the wrapper
raises :class:`HubUnreachableError` naming the network, the id and the run-file key instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub.errors import LocalEntryNotFoundError


class HubUnreachableError(RuntimeError):
    """The model hub cannot be reached and the weights are not cached; the message says what to do."""


def unreachable_message(name: str, key: str) -> str:
    return (
        f"cannot reach the model hub and {name} is not in the local cache; download it first "
        f"(e.g. `hf download {name}` on a machine with network) or set {key} to a local folder"
    )


@contextmanager
def hub_access(name: str, key: str) -> Iterator[None]:
    """Load ``name`` (hub id or folder, given by run-file key ``key``) inside this block."""
    try:
        yield
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, LocalEntryNotFoundError):
                raise HubUnreachableError(unreachable_message(name, key)) from None
            cause = cause.__cause__ or cause.__context__
        raise
