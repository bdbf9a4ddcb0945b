"""The cache manifest (``manifest.json``): one entry per usable sample and where each of its parts lives.

Written once at the end of ``crepa precompute`` (by rank 0) from what the shards hold; readers
(:class:`~crepa.cache.CachedDataset`) need nothing else. The shards stay the source of truth: a
killed run leaves no manifest update, and the next run rebuilds it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crepa.cache.atomic import atomic_write_json
from crepa.cache.shards import PartLocation

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class CacheEntry:
    """One sample: where its pixels come from, its bucket, and the keys of its parts.

    num_frames, size: the bucket (T pixel frames, (H, W)); grid: the student token grid
    (F' latent frames, H', W'); parts: {"latents": key, "text": key[, "teacher": key]}.
    file_size / file_mtime_ns let the online "pixels" mode notice a video changed since; source: the
    index of its ``[[data.sources]]`` entry (0 for ``data.source``).
    """

    index: int
    key: str
    video: str
    caption: str
    frame_indices: tuple[int, ...]
    size: tuple[int, int]
    grid: tuple[int, int, int]
    parts: dict[str, str]
    file_size: int
    file_mtime_ns: int
    source: int = 0  # which of the run file's data sources the sample came from

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def bucket(self) -> tuple[int, int, int]:
        """(T, H, W): samples of one bucket have equal tensor shapes."""
        return (self.num_frames, *self.size)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> CacheEntry:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        tuples = {key: tuple(document[key]) for key in ("frame_indices", "size", "grid")}
        return cls(**{**document, **tuples})


@dataclass
class Manifest:
    """family / pretrained / temporal_ratio: the model the latents belong to; teacher: the teacher's
    identity, settings and feature width ``dim`` (None when the cache holds no teacher grids);
    null_text: key of the empty prompt's text part (for caption dropout); identity: the facts every
    part key was computed from (``crepa.precompute.CacheIdentity.facts``), which ``crepa train``
    compares with its run file."""

    family: str
    pretrained: str
    temporal_ratio: int
    teacher: dict[str, Any] | None
    entries: list[CacheEntry]
    parts: dict[str, PartLocation]
    null_text: str | None = None
    identity: dict[str, Any] | None = None
    version: int = MANIFEST_VERSION

    def part_bytes(self) -> dict[str, int]:
        """Bytes of tensor data per part kind, over the parts the entries use (shared parts counted once)."""
        used = {key for entry in self.entries for key in entry.parts.values()}
        totals: dict[str, int] = {}
        for key in used:
            location = self.parts[key]
            totals[location.kind] = totals.get(location.kind, 0) + location.nbytes
        return totals

    def write(self, cache_dir: str | os.PathLike) -> Path:
        document = asdict(self)
        document["parts"] = {key: asdict(location) for key, location in sorted(self.parts.items())}
        return atomic_write_json(Path(cache_dir) / MANIFEST_NAME, document)

    @classmethod
    def read(cls, cache_dir: str | os.PathLike) -> Manifest:
        """Raises ``FileNotFoundError`` / ``ValueError`` with the fix when there is no usable manifest."""
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no cache manifest; run `crepa precompute CONFIG` first")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: damaged manifest ({error}); run `crepa precompute CONFIG` again"
            ) from None
        if document.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"{path}: manifest version {document.get('version')}, this crepa reads {MANIFEST_VERSION}; "
                "run `crepa precompute CONFIG` again"
            )
        try:
            entries = [CacheEntry.from_json(entry) for entry in document.pop("entries")]
            parts = {
                key: PartLocation(
                    **{
                        **location,
                        "shapes": {name: tuple(shape) for name, shape in location["shapes"].items()},
                    }
                )
                for key, location in document.pop("parts").items()
            }
            return cls(entries=entries, parts=parts, **document)
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{path}: damaged manifest ({error}); run `crepa precompute CONFIG` again"
            ) from None
