"""Video input: dataset listings, timestamp-exact frame sampling, buckets, and a report of every skip.

Typical use::

    samples, report = scan_dataset("clips/", SamplingConfig(target_fps=16, frame_buckets=(17, 33, 49)))
    for sample, (frames, caption, meta) in iter_decoded(samples, report):
        ...
    print(report.summary())
"""

from crepa.data.buckets import choose_frame_bucket, choose_resolution_bucket
from crepa.data.config import SamplingConfig
from crepa.data.dataset import DecodedSample, VideoSample, iter_decoded, load_sample, scan_dataset
from crepa.data.report import DataReport, SkippedFile
from crepa.data.sampling import (
    ClipTooShortError,
    available_frame_count,
    sample_frame_indices,
    uniform_timestamps,
)
from crepa.data.sources import VIDEO_EXTENSIONS, SourceEntry, list_source
from crepa.data.transforms import cover_size, resize_center_crop, resize_frames, to_unit_float

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipTooShortError",
    "DataReport",
    "DecodedSample",
    "SamplingConfig",
    "SkippedFile",
    "SourceEntry",
    "VideoSample",
    "available_frame_count",
    "choose_frame_bucket",
    "choose_resolution_bucket",
    "cover_size",
    "iter_decoded",
    "list_source",
    "load_sample",
    "resize_center_crop",
    "resize_frames",
    "sample_frame_indices",
    "scan_dataset",
    "to_unit_float",
    "uniform_timestamps",
]
