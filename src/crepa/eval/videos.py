"""Finding and reading the clips to evaluate: video files (PyAV) and folders of frame images (OpenCV)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crepa.io.video import read_video_frames

VIDEO_SUFFIXES = frozenset({".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class Clip:
    """One clip to evaluate: a video file or a folder of frame images."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def read(self) -> tuple[np.ndarray, float]:
        """uint8 RGB frames (T, H, W, 3) and fps (0.0 for a frame folder, whose rate is unknown)."""
        if self.path.is_dir():
            return read_frame_folder(self.path), 0.0
        return read_video_frames(self.path)


def find_clips(directory: str | Path) -> list[Clip]:
    """Video files (mp4, gif, webm, mov, mkv, avi) and sub-folders of ``directory``, sorted by name.

    Other files (captions, prompts) are ignored; every sub-folder is taken as a frame folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory: give the folder that holds the videos")
    entries = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    return [
        Clip(entry)
        for entry in entries
        if not entry.name.startswith(".") and (entry.is_dir() or entry.suffix.lower() in VIDEO_SUFFIXES)
    ]


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
