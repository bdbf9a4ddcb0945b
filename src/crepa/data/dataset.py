"""Scan a dataset into bucketed samples, then decode them; bad inputs are skipped and reported."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from crepa.data.buckets import choose_frame_bucket, choose_resolution_bucket
from crepa.data.config import SamplingConfig
from crepa.data.report import DataReport
from crepa.data.sampling import available_frame_count, sample_frame_indices
from crepa.data.sources import list_source
from crepa.data.transforms import resize_center_crop
from crepa.io.video import (
    IMAGE_CODEC,
    VideoBackend,
    VideoDecodeError,
    VideoProbe,
    decode_frames,
    probe_clip,
)


@dataclass(frozen=True)
class VideoSample:
    """A usable clip: its caption, which frames to decode, and the resolution bucket (H, W)."""

    path: Path
    caption: str
    probe: VideoProbe
    frame_indices: tuple[int, ...]
    size: tuple[int, int]

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


class DecodedSample(NamedTuple):
    """frames: (T, 3, H, W) float32 in [0, 1], or (T, H, W, 3) uint8; meta: where they came from."""

    frames: torch.Tensor
    caption: str
    meta: dict[str, Any]


def _problem(error: VideoDecodeError) -> str:
    return "missing file" if error.reason == "file not found" else "unreadable video"


def scan_dataset(
    source: str | os.PathLike,
    config: SamplingConfig,
    *,
    video_column: str = "video",
    caption_column: str = "caption",
) -> tuple[list[VideoSample], DataReport]:
    """List ``source`` (folder, .csv or .jsonl), probe every video and choose its frames and buckets.

    Returns the usable samples and a :class:`DataReport`; missing files, unreadable videos, empty
    captions and clips too short for the smallest frame bucket are skipped, each with a warning.
    """
    report = DataReport()
    samples = []
    for entry in list_source(source, report, video_column, caption_column):
        caption = entry.caption.strip()
        if not caption:
            report.skip(entry.video, "empty caption")
            continue
        try:
            probe = probe_clip(entry.video)
        except VideoDecodeError as error:
            report.skip(entry.video, _problem(error), error.reason)
            continue
        available = available_frame_count(probe.timestamps, config.target_fps, config.stride, config.start)
        num_frames = choose_frame_bucket(available, config.frame_buckets)
        if num_frames is None and probe.codec == IMAGE_CODEC:
            report.skip(
                entry.video,
                "image without a one-frame bucket",
                "an image is a one-frame clip: add 1 to its source's num_frames (families that take images)",
            )
            continue
        if num_frames is None:
            rate = f"at {config.target_fps:g} fps" if config.target_fps else "at the source rate"
            report.skip(
                entry.video,
                "too short",
                f"supplies {available} frames {rate} (stride {config.stride}, start {config.start:g}s; "
                f"{probe.num_frames} frames at {probe.fps:.3g} fps), the smallest bucket needs "
                f"{config.frame_buckets[0]}",
            )
            continue
        indices = sample_frame_indices(
            probe.timestamps, num_frames, config.target_fps, config.stride, config.start
        )
        size = choose_resolution_bucket((probe.height, probe.width), config.resolution_buckets)
        samples.append(VideoSample(entry.video, caption, probe, tuple(indices), size))
        report.use(entry.video)
    return samples, report


def load_sample(
    sample: VideoSample, *, backend: VideoBackend = "auto", output: Literal["float", "uint8"] = "float"
) -> DecodedSample:
    """Decode ``sample``'s frames, resize them to cover its bucket and centre-crop.

    Raises :class:`~crepa.io.video.VideoDecodeError` when the file cannot deliver them.
    """
    raw, times = decode_frames(sample.probe, sample.frame_indices, backend)
    frames = resize_center_crop(raw, sample.size)
    if output == "uint8":
        frames = frames.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    meta = {
        "path": str(sample.path),
        "frame_indices": sample.frame_indices,
        "timestamps": times.tolist(),
        "size": sample.size,
        "source_size": (sample.probe.height, sample.probe.width),
        "source_fps": sample.probe.fps,
    }
    return DecodedSample(frames, sample.caption, meta)


def iter_decoded(
    samples: Iterable[VideoSample],
    report: DataReport,
    *,
    backend: VideoBackend = "auto",
    output: Literal["float", "uint8"] = "float",
) -> Iterator[tuple[VideoSample, DecodedSample]]:
    """Decode samples one by one; a file that fails is recorded in ``report`` (moved from used to
    skipped) and the iteration goes on."""
    for sample in samples:
        try:
            decoded = load_sample(sample, backend=backend, output=output)
        except VideoDecodeError as error:
            report.skip(sample.path, _problem(error), error.reason)
            continue
        yield sample, decoded
