"""The names ``crepa eval`` offers: metrics, their default feature extractors, extractor kinds and
optical-flow methods. Plain data with no torch / OpenCV import, so the CLI's help lists them at once."""

from __future__ import annotations

from typing import Literal

CONSISTENCY_METRICS: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "warping_error",
)
MOTION_METRICS: tuple[str, ...] = ("dynamic_degree", "flow_magnitude")
PER_CLIP_METRICS: tuple[str, ...] = CONSISTENCY_METRICS + MOTION_METRICS
METRICS: tuple[str, ...] = (*PER_CLIP_METRICS, "frechet_distance")
# The metrics that need a feature extractor, and the one each uses unless told otherwise.
DEFAULT_EXTRACTORS: dict[str, str] = {
    "subject_consistency": "dino",
    "background_consistency": "clip",
    "frechet_distance": "dinov2",
}
# The KIND of an extractor SPEC (crepa.eval.extractors builds each; "py" is py:module:factory).
EXTRACTOR_KINDS: tuple[str, ...] = ("dino", "clip", "dinov2", "videomae", "teacher", "py")

FlowMethod = Literal["dis", "farneback"]
FLOW_METHODS: tuple[str, ...] = ("dis", "farneback")
