"""Cached demo artefacts (world, teacher, extractor, base model): built once, reused while their
settings are unchanged, published atomically so an interrupted build is never mistaken for a done one."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crepa.cache.atomic import atomic_write_json

STAMP_FILE = "demo-stamp.json"


def settings_digest(settings: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the canonical JSON of ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_current(path: Path, settings: Mapping[str, Any]) -> bool:
    """Whether ``path`` holds an artefact built with exactly ``settings``."""
    stamp = path / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text(encoding="utf-8")).get("digest") == settings_digest(settings)
    except (OSError, json.JSONDecodeError):
        return False


def build_once(path: Path, settings: Mapping[str, Any], build: Callable[[Path], None]) -> bool:
    """Reuse ``path`` if built with ``settings``; else ``build(staging)`` into a sibling folder, stamp
    it, and move it into place. Returns True when the artefact was reused."""
    if is_current(path, settings):
        return True
    staging = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    atomic_write_json(staging / STAMP_FILE, {"digest": settings_digest(settings), "settings": settings})
    shutil.rmtree(path, ignore_errors=True)
    staging.replace(path)
    return False
