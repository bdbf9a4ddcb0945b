"""Measurements of generated videos and of a model's representations (``crepa eval``).

Pure metrics take arrays / tensors: :mod:`consistency`, :mod:`flicker`, :mod:`flow`,
:mod:`frechet`, :mod:`cknna`. Models and files live at the edges: :mod:`extractors`,
:mod:`layers`, :mod:`videos`, :mod:`report`.
"""

from crepa.eval.cknna import cknna, unbiased_hsic
from crepa.eval.consistency import consistency_pair_scores, consistency_score
from crepa.eval.flicker import temporal_flickering
from crepa.eval.flow import ClipMotion, clip_motion, optical_flow, warping_errors
from crepa.eval.frechet import frechet_distance

__all__ = [
    "ClipMotion",
    "cknna",
    "clip_motion",
    "consistency_pair_scores",
    "consistency_score",
    "frechet_distance",
    "optical_flow",
    "temporal_flickering",
    "unbiased_hsic",
    "warping_errors",
]
