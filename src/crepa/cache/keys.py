"""Cache keys: a part is recomputed exactly when something it depends on changes.

- latents: the video file's bytes, the sampled frames and the resolution, the model family, the
  VAE (id / fingerprint) and the compute dtype;
- text: the caption, the family, the text encoder(s), the text length and the compute dtype;
- teacher: the video file's bytes, the sampled frames and the resolution, the teacher (id /
  fingerprint, input size budget), the frame reduction and the student grid.

Keys are sha256 digests of a canonical JSON document of those facts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump when decoding / resizing / encoding changes in a way the facts above do not capture.
PREPROCESSING_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_READ_CHUNK = 1 << 22


def digest(document: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``document``."""
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_fingerprint(
    source: str | os.PathLike, revision: str | None = None, subfolders: Iterable[str] = ("",)
) -> str:
    """Identity of model weights: a hub id with its revision, or for a local directory a digest of
    the config files' contents and of the weight files' names, sizes and modification times
    inside ``subfolders`` (weights are not read: hashing a 10 GB text encoder on every run is too slow)."""
    path = Path(source)
    if not path.is_dir():
        return f"{source}@{revision or 'main'}"
    facts: dict[str, Any] = {}
    for subfolder in subfolders:
        folder = path / subfolder
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix == ".json":
                facts[f"{subfolder}/{file.name}"] = file.read_text(encoding="utf-8")
            elif file.name.endswith(_WEIGHT_SUFFIXES):
                stat = file.stat()
                facts[f"{subfolder}/{file.name}"] = [stat.st_size, stat.st_mtime_ns]
    return f"{path.resolve()}#{digest(facts)[:16]}"


@dataclass
class FileHasher:
    """sha256 of files' bytes, remembered by (size, mtime) so unchanged files are read once.

    ``memo`` maps a resolved path to [size, mtime_ns, sha256]; it is saved next to the cache.
    """

    memo: dict[str, list[Any]] = field(default_factory=dict)

    def __call__(self, path: str | os.PathLike) -> str:
        resolved = str(Path(path).resolve())
        stat = os.stat(resolved)
        known = self.memo.get(resolved)
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        sha = hashlib.sha256()
        with open(resolved, "rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                sha.update(chunk)
        self.memo[resolved] = [stat.st_size, stat.st_mtime_ns, sha.hexdigest()]
        return self.memo[resolved][2]


def clip_facts(file_sha256: str, frame_indices: Iterable[int], size: tuple[int, int]) -> dict[str, Any]:
    """What fixes a clip's pixels: the file's bytes, the frames taken from it and the resolution."""
    return {
        "file": file_sha256,
        "frames": list(frame_indices),
        "size": list(size),
        "preprocessing": PREPROCESSING_VERSION,
    }


def latents_key(clip: Mapping[str, Any], family: str, vae: str, dtype: str) -> str:
    return digest({"part": "latents", "clip": clip, "family": family, "vae": vae, "dtype": dtype})


def text_key(caption: str, family: str, text_encoders: str, max_length: int, dtype: str) -> str:
    return digest(
        {
            "part": "text",
            "caption": caption,
            "family": family,
            "encoders": text_encoders,
            "max_length": max_length,
            "dtype": dtype,
        }
    )


def teacher_key(
    clip: Mapping[str, Any],
    teacher: Mapping[str, Any],
    student_grid: tuple[int, int, int],
    temporal_ratio: int,
) -> str:
    """``teacher`` holds the teacher's identity and settings (fingerprint, kind, max_pixels, reduce)."""
    return digest(
        {
            "part": "teacher",
            "clip": clip,
            "teacher": dict(teacher),
            "grid": list(student_grid),
            "temporal_ratio": temporal_ratio,
        }
    )
