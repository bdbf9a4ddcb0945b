"""Read and write video files with PyAV (it bundles FFmpeg, so it works on any machine).

Frames are uint8 arrays (T, H, W, 3), RGB.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import numpy as np


def read_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All decoded frames of ``path`` as (T, H, W, 3) uint8 RGB, and the stream's average fps."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames), fps


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames as an H.264 mp4 (or GIF by extension), atomically.

    Height and width must be even for yuv420p mp4.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        _encode(tmp, frames, fps, crf, gif=path.suffix.lower() == ".gif")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encode(path: str, frames: np.ndarray, fps: float, crf: int, gif: bool) -> None:
    from fractions import Fraction

    height, width = frames.shape[1:3]
    with av.open(path, mode="w") as container:
        if gif:
            stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1000))
            stream.pix_fmt = "rgb8"
        else:
            if height % 2 or width % 2:
                raise ValueError(f"mp4 (yuv420p) needs even height and width, got {height}x{width}")
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
        stream.width, stream.height = width, height
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
