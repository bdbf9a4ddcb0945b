"""Scoped silence for a known notice of another library: a logging filter held while one call runs,
so that the same logger's other records still reach the user."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def without_log_messages(logger_name: str, drop: Callable[[str], bool]) -> Iterator[None]:
    """While the block runs, the records of logger ``logger_name`` whose message ``drop`` accepts are
    discarded; every other record is handled as usual."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not drop(record.getMessage())

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
