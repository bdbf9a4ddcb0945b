"""Evaluate a folder of clips: per-clip metrics, their aggregates (VBench's rules), and the Frechet distance."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crepa.data.report import DataReport, SkippedFile
from crepa.eval.consistency import consistency_score
from crepa.eval.extractors import FeatureExtractor, load_extractor
from crepa.eval.flicker import temporal_flickering
from crepa.eval.flow import clip_motion
from crepa.eval.frechet import MIN_STABLE_CLIPS, frechet_distance
from crepa.eval.names import (
    CONSISTENCY_METRICS,
    DEFAULT_EXTRACTORS,
    METRICS,
    MOTION_METRICS,
    PER_CLIP_METRICS,
    FlowMethod,
)
from crepa.eval.videos import Clip
from crepa.io.video import VideoDecodeError

UNREADABLE = "unreadable clip"  # the problem recorded for a video or frame folder that cannot be decoded
# Which direction is better; None for the motion measures, which give context, not quality.
BETTER: dict[str, str | None] = {
    "subject_consistency": "higher",
    "background_consistency": "higher",
    "temporal_flickering": "higher",
    "warping_error": "lower",
    "dynamic_degree": None,
    "flow_magnitude": None,
    "frechet_distance": "lower",
}

# How each metric is computed, and where it departs from the public definition (in metrics.json).
METRIC_NOTES: dict[str, str] = {
    "subject_consistency": "VBench formula (mean over t>=2 of the clipped cosine to the previous and to the "
    "first frame); aggregate weighted by frame pairs as in VBench. Same as VBench when the extractor is "
    "DINO ViT-B/16.",
    "background_consistency": "VBench formula; aggregate weighted by frame pairs. Same as VBench when the "
    "extractor is CLIP ViT-B/32.",
    "temporal_flickering": "VBench formula (255 - mean abs difference of consecutive frames) / 255, mean over "
    "clips. VBench computes it only on its static-scene prompts; here it is computed on every clip, so it "
    "also drops with real motion.",
    "warping_error": "Mean squared difference (pixels in [0, 1]) between frame t and frame t+1 warped onto it "
    "with OpenCV flow, over pixels passing the forward-backward check (alpha 0.01, beta 0.5); lower is better.",
    "dynamic_degree": "Fraction of clips VBench would call dynamic (top-5% flow magnitude above "
    "6 * short_side / 256 px on at least round(4 * frames / 16) pairs, frames subsampled to ~8 fps), but "
    "with OpenCV optical flow instead of RAFT, so values can differ from VBench's.",
    "flow_magnitude": "Mean optical-flow length in pixels per frame (OpenCV flow, consecutive frames).",
    "frechet_distance": "Frechet distance between per-clip features of the clips and the reference clips "
    "(frame-level extractors are averaged over time); unstable below 256 clips per set.",
}


@dataclass
class ClipResult:
    """One evaluated clip: its size, fps and one value per per-clip metric."""

    name: str
    path: str
    frames: int
    height: int
    width: int
    fps: float
    values: dict[str, float]
    caption: str | None = None


@dataclass
class EvalResult:
    """Everything ``crepa eval`` reports for one folder of clips."""

    clips: list[ClipResult]
    skipped: list[SkippedFile]
    summary: dict[str, dict[str, Any]]
    extractors: dict[str, str]
    flow_method: str
    timings: dict[str, float] = field(default_factory=dict)
    reference_skipped: list[SkippedFile] = field(default_factory=list)


class StageTimer:
    """Wall time accumulated per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def resolve_metrics(requested: Sequence[str] | None, with_reference: bool) -> tuple[str, ...]:
    """The metrics to compute, in canonical order.

    None means every per-clip metric, plus the Frechet distance when there is a reference set.
    Motion metrics are added whenever a consistency metric is asked for (a frozen clip maximises
    consistency, so consistency alone cannot be read).
    """
    chosen = (
        set(requested)
        if requested
        else set(PER_CLIP_METRICS) | ({"frechet_distance"} if with_reference else set())
    )
    unknown = sorted(chosen - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if "frechet_distance" in chosen and not with_reference:
        raise ValueError("frechet_distance compares two sets of clips: give the real clips with --reference")
    if chosen & set(CONSISTENCY_METRICS):
        chosen |= set(MOTION_METRICS)
    return tuple(name for name in METRICS if name in chosen)


def check_extractors(metrics: Sequence[str], extractors: Mapping[str, FeatureExtractor]) -> None:
    """Every feature metric has an extractor, and the consistency ones have per-frame features."""
    for metric in metrics:
        if metric not in DEFAULT_EXTRACTORS:
            continue
        if metric not in extractors:
            raise ValueError(f"{metric} needs a feature extractor; none was given")
        if metric != "frechet_distance" and extractors[metric].level != "frame":
            raise ValueError(
                f"{metric} compares frames, but extractor {extractors[metric].name} gives one feature per "
                "clip; use a per-frame extractor (dino, clip, dinov2, teacher), or give the video model to "
                "the Frechet distance only (--extractor frechet_distance=SPEC)"
            )


def extractor_specs(values: list[str], metrics: tuple[str, ...]) -> dict[str, str]:
    """Extractor spec per feature metric in ``metrics``: the defaults, replaced by one bare SPEC
    (for every feature metric), then by METRIC=SPEC entries."""
    specs = {metric: spec for metric, spec in DEFAULT_EXTRACTORS.items() if metric in metrics}
    per_metric: dict[str, str] = {}
    everywhere: list[str] = []
    for value in values:
        name, separator, spec = value.partition("=")
        if separator and name in DEFAULT_EXTRACTORS:
            per_metric[name] = spec
        elif separator and name in METRICS:
            raise ValueError(
                f"--extractor {value}: {name} uses no extractor (these do: {', '.join(DEFAULT_EXTRACTORS)})"
            )
        else:
            everywhere.append(value)
    if len(everywhere) > 1:
        raise ValueError(
            f"give one --extractor SPEC for all metrics, or METRIC=SPEC each; got {', '.join(everywhere)}"
        )
    if everywhere:
        specs = dict.fromkeys(specs, everywhere[0])
    specs.update({metric: spec for metric, spec in per_metric.items() if metric in specs})
    return specs


def load_extractors(specs: dict[str, str], device: str, batch_size: int) -> dict[str, FeatureExtractor]:
    """One extractor instance per distinct spec, shared by the metrics that use it."""
    loaded: dict[str, FeatureExtractor] = {}
    for spec in dict.fromkeys(specs.values()):
        loaded[spec] = load_extractor(spec, device=device, batch_size=batch_size)
    return {metric: loaded[spec] for metric, spec in specs.items()}


def per_clip_feature(features: torch.Tensor) -> np.ndarray:
    """(T, D) frame features averaged over time, or a (D,) clip feature as is -> float64 (D,)."""
    pooled = features.mean(dim=0) if features.ndim == 2 else features
    return pooled.double().numpy()


def evaluate_clip(
    frames: np.ndarray,
    fps: float,
    metrics: Sequence[str],
    extractors: Mapping[str, FeatureExtractor],
    flow_method: FlowMethod,
    timer: StageTimer,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Per-clip metric values of uint8 frames (T, H, W, 3), and the clip's Frechet feature (or None)."""
    values: dict[str, float] = {}
    features_by_extractor: dict[int, torch.Tensor] = {}
    with timer.stage("features"):
        for metric in metrics:
            if metric in DEFAULT_EXTRACTORS:
                extractor = extractors[metric]
                if id(extractor) not in features_by_extractor:
                    features_by_extractor[id(extractor)] = extractor(frames)
        for metric in ("subject_consistency", "background_consistency"):
            if metric in metrics:
                values[metric] = consistency_score(features_by_extractor[id(extractors[metric])])
    if "temporal_flickering" in metrics:
        with timer.stage("flicker"):
            values["temporal_flickering"] = temporal_flickering(frames)
    if {"warping_error", *MOTION_METRICS} & set(metrics):
        with timer.stage("flow"):
            motion = clip_motion(frames, fps, flow_method, warping="warping_error" in metrics)
        if "warping_error" in metrics:
            values["warping_error"] = motion.warping_error
        if "dynamic_degree" in metrics:
            values["dynamic_degree"] = float(motion.dynamic)
        if "flow_magnitude" in metrics:
            values["flow_magnitude"] = motion.flow_magnitude
    frechet_feature = None
    if "frechet_distance" in metrics:
        frechet_feature = per_clip_feature(features_by_extractor[id(extractors["frechet_distance"])])
    return values, frechet_feature


def read_clip(clip: Clip, timer: StageTimer) -> tuple[np.ndarray, float]:
    """Decode a clip; raises ValueError with the reason (without the path) when it cannot be evaluated."""
    with timer.stage("decode"):
        try:
            frames, fps = clip.read()
        except VideoDecodeError as error:
            raise ValueError(error.reason) from error
        except ValueError:
            raise
        except Exception as error:  # any decoder failure means "skip this clip and say why"
            raise ValueError(f"{type(error).__name__}: {error}") from error
    if len(frames) < 2:
        raise ValueError(f"only {len(frames)} frame; temporal metrics need at least 2")
    return frames, fps


def evaluate_clips(
    clips: Sequence[Clip],
    metrics: Sequence[str],
    extractors: Mapping[str, FeatureExtractor],
    *,
    reference: Sequence[Clip] = (),
    flow_method: FlowMethod = "dis",
    progress: bool = True,
    report: DataReport | None = None,
    reference_report: DataReport | None = None,
) -> EvalResult:
    """Evaluate ``clips`` (and, for the Frechet distance, ``reference``); unreadable clips are skipped.

    ``extractors`` maps each feature metric to its extractor (one instance may serve several).
    ``report`` / ``reference_report``: what listing the clips already skipped (see
    :func:`~crepa.eval.videos.find_clips`); each clip evaluated or skipped here is added to it.
    """
    check_extractors(metrics, extractors)
    report = report if report is not None else DataReport()
    reference_report = reference_report if reference_report is not None else DataReport()
    timer = StageTimer()
    results: list[ClipResult] = []
    frechet_features: list[np.ndarray] = []
    for clip in tqdm(clips, desc="clips", unit="clip", disable=not progress):
        try:
            frames, fps = read_clip(clip, timer)
        except ValueError as error:
            report.skip(clip.path, UNREADABLE, str(error))
            continue
        report.use(clip.path)
        values, feature = evaluate_clip(frames, fps, metrics, extractors, flow_method, timer)
        if feature is not None:
            frechet_features.append(feature)
        height, width = frames.shape[1:3]
        results.append(
            ClipResult(clip.name, str(clip.path), len(frames), height, width, fps, values, clip.caption)
        )

    summary = summarize(results, [m for m in metrics if m in PER_CLIP_METRICS])
    if "frechet_distance" in metrics:
        extractor = extractors["frechet_distance"]
        reference_features = []
        for clip in tqdm(reference, desc="reference clips", unit="clip", disable=not progress):
            try:
                frames, _ = read_clip(clip, timer)
            except ValueError as error:
                reference_report.skip(clip.path, UNREADABLE, str(error))
                continue
            reference_report.use(clip.path)
            with timer.stage("features"):
                reference_features.append(per_clip_feature(extractor(frames)))
        with timer.stage("frechet"):
            summary["frechet_distance"] = frechet_summary(frechet_features, reference_features)
    for metric, note in METRIC_NOTES.items():
        if metric in summary:
            summary[metric]["note"] = note
            if metric in DEFAULT_EXTRACTORS:
                summary[metric]["extractor"] = extractors[metric].name
    return EvalResult(
        clips=results,
        skipped=list(report.skipped),
        summary=summary,
        extractors={metric: extractors[metric].name for metric in metrics if metric in DEFAULT_EXTRACTORS},
        flow_method=flow_method,
        timings=timer.seconds,
        reference_skipped=list(reference_report.skipped),
    )


def summarize(clips: Sequence[ClipResult], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Aggregate per-clip values: ``value`` by VBench's rule, ``std`` and ``sem`` over clips, ``count``.

    Subject and background consistency are averaged over all frame pairs (VBench's sum / count), so
    longer clips weigh more; every other metric is a plain mean over clips. NaN values (a clip
    with no consistent pixel for the warping error) are left out. ``per_clip`` keeps every clip's value
    in clip order (None for NaN), so metrics of one clip can be related (e.g. consistency to motion).
    """
    summary: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        values = np.array([clip.values[metric] for clip in clips], dtype=np.float64)
        per_clip = [float(v) if math.isfinite(v) else None for v in values]
        weights = np.array([clip.frames - 1 for clip in clips], dtype=np.float64)
        finite = np.isfinite(values)
        values, weights = values[finite], weights[finite]
        count = int(values.size)
        if count == 0:
            summary[metric] = {"value": None, "std": None, "sem": None, "count": 0, "per_clip": per_clip}
            continue
        if metric in ("subject_consistency", "background_consistency"):
            value = float((values * weights).sum() / weights.sum())
        else:
            value = float(values.mean())
        std = float(values.std(ddof=1)) if count > 1 else 0.0
        summary[metric] = {
            "value": value,
            "std": std,
            "sem": std / math.sqrt(count),
            "count": count,
            "per_clip": per_clip,
        }
    return summary


def frechet_summary(features: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, Any]:
    """Frechet distance of two lists of per-clip features, with the clip counts and any warning."""
    entry: dict[str, Any] = {"value": None, "clips": len(features), "reference_clips": len(reference)}
    if min(len(features), len(reference)) < 2:
        entry["warning"] = "needs at least 2 readable clips in each set"
        return entry
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry["value"] = frechet_distance(np.stack(features), np.stack(reference))
    if min(len(features), len(reference)) < MIN_STABLE_CLIPS:
        entry["warning"] = (
            f"only {min(len(features), len(reference))} clips in the smaller set; below {MIN_STABLE_CLIPS} "
            "the Frechet distance is unstable"
        )
    for warning in caught:
        if "unstable" not in str(warning.message):
            warnings.warn(warning.message, stacklevel=2)
    return entry
