"""Run files of the demo's training runs, written as TOML and read back with :func:`crepa.config.load_config`,
so each run is exactly what ``crepa precompute RUN.toml`` / ``crepa train RUN.toml`` would do."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crepa.cache.atomic import atomic_write_bytes
from crepa.config import RunConfig, load_config


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string, path or (nested) list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def write_run_file(path: Path, sections: Mapping[str, Mapping[str, Any]], comment: str) -> RunConfig:
    """Write ``sections`` ({section: {key: value}}) as a run file at ``path`` and load it back."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for section, values in sections.items():
        lines += ["", f"[{section}]", *(f"{key} = {toml_value(value)}" for key, value in values.items())]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return load_config(path)
