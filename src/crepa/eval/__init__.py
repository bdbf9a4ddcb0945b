"""Measurements of generated videos and of a model's representations (``crepa eval``).

Pure metrics take arrays / tensors: :mod:`consistency`, :mod:`flicker`, :mod:`flow`,
:mod:`frechet`, :mod:`cknna`. Models and files live at the edges: :mod:`extractors`,
:mod:`layers`, :mod:`videos`, :mod:`report`.
"""

from crepa.eval.cknna import cknna, unbiased_hsic
from crepa.eval.consistency import consistency_pair_scores, consistency_score
from crepa.eval.evaluate import EvalResult, evaluate_clips, resolve_metrics
from crepa.eval.extractors import CallableExtractor, FeatureExtractor, TeacherExtractor, load_extractor
from crepa.eval.flicker import temporal_flickering
from crepa.eval.flow import ClipMotion, clip_motion, optical_flow, warping_errors
from crepa.eval.frechet import frechet_distance
from crepa.eval.layers import adjacent_frame_similarity, block_cknna, layer_similarity_profile
from crepa.eval.report import write_comparison, write_eval_report, write_layer_report
from crepa.eval.videos import find_clips

__all__ = [
    "CallableExtractor",
    "ClipMotion",
    "EvalResult",
    "FeatureExtractor",
    "TeacherExtractor",
    "adjacent_frame_similarity",
    "block_cknna",
    "cknna",
    "clip_motion",
    "consistency_pair_scores",
    "consistency_score",
    "evaluate_clips",
    "find_clips",
    "frechet_distance",
    "layer_similarity_profile",
    "load_extractor",
    "optical_flow",
    "resolve_metrics",
    "temporal_flickering",
    "unbiased_hsic",
    "warping_errors",
    "write_comparison",
    "write_eval_report",
    "write_layer_report",
]
