"""Finding and reading the clips to evaluate: video files (PyAV), folders of frame images (OpenCV),
and the clips a ``samples.jsonl`` manifest lists (``crepa sample``, training validation), with their prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crepa.data.report import DataReport
from crepa.data.sources import VIDEO_EXTENSIONS, list_source, read_text
from crepa.io.video import read_video_frames

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
SAMPLES_MANIFEST = "samples.jsonl"


@dataclass(frozen=True)
class Clip:
    """One clip to evaluate: a video file or a folder of frame images, and its caption or prompt."""

    path: Path
    caption: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def read(self) -> tuple[np.ndarray, float]:
        """uint8 RGB frames (T, H, W, 3) and fps (0.0 for a frame folder, whose rate is unknown)."""
        if self.path.is_dir():
            return read_frame_folder(self.path), 0.0
        return read_video_frames(self.path)


def find_clips(path: str | Path, report: DataReport | None = None, given_as: str | None = None) -> list[Clip]:
    """The clips of a folder, or of a ``samples.jsonl`` manifest.

    A manifest (given, or in the folder) lists the clips to take (its ``file`` entries) with their
    ``prompt`` as caption. Otherwise: video files (mp4, gif, webm, mov, mkv, avi, ...) and sub-folders
    (frame folders), sorted by name, each captioned by a ``.txt`` file of the same stem if there is one,
    in any encoding. A manifest row or caption file that cannot be read goes to ``report`` (a warning
    is logged either way); only a path that is neither a folder nor a manifest raises ``ValueError``,
    which names ``given_as`` (the flag or argument the path came from, e.g. ``--reference``) if given.
    """
    path = Path(path)
    report = report if report is not None else DataReport()
    if path.is_file() and path.suffix == ".jsonl":
        return read_manifest(path, report)
    if not path.is_dir():
        where = f"{given_as} {path}" if given_as else str(path)
        raise ValueError(
            f"{where} is not a directory: give the folder that holds the videos or a samples.jsonl"
        )
    if (path / SAMPLES_MANIFEST).is_file():
        return read_manifest(path / SAMPLES_MANIFEST, report)
    entries = sorted(path.iterdir(), key=lambda p: natural_key(p.name))
    return [
        Clip(entry, _caption_beside(entry, report))
        for entry in entries
        if not entry.name.startswith(".") and (entry.is_dir() or entry.suffix.lower() in VIDEO_EXTENSIONS)
    ]


def _caption_beside(clip: Path, report: DataReport) -> str | None:
    """The clip's caption file (same stem, ``.txt``) as text; None when absent or unreadable (reported)."""
    text = clip.with_suffix(".txt") if clip.is_file() else clip.parent / f"{clip.name}.txt"
    if not text.is_file():
        return None
    try:
        return read_text(text).strip()
    except OSError as error:
        report.skip(
            text, "unreadable caption", f"{error.strerror or error}; {clip.name} is evaluated without it"
        )
        return None


def read_manifest(path: Path, report: DataReport | None = None) -> list[Clip]:
    """Clips of a ``samples.jsonl`` (any encoding): one JSON object per line with ``file`` (relative to
    the manifest's folder, or absolute) and ``prompt``; a malformed line goes to ``report``."""
    entries = list_source(path, report if report is not None else DataReport(), "file", "prompt")
    return [Clip(entry.video, entry.caption) for entry in entries]


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders "frame_2" before "frame_10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_frame_folder(folder: Path) -> np.ndarray:
    """PNG/JPG frames of ``folder`` in natural name order -> uint8 RGB (T, H, W, 3)."""
    images = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name)
    )
    if not images:
        raise ValueError(f"{folder}: no PNG or JPG frames in this folder")
    frames = []
    for image in images:
        bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{image}: not a readable image")
        if frames and bgr.shape != frames[0].shape:
            raise ValueError(
                f"{image}: size {bgr.shape[:2]} differs from the first frame's {frames[0].shape[:2]}"
            )
        frames.append(bgr)
    return np.stack(frames)[..., ::-1].copy()
