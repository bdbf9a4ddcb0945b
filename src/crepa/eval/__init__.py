"""Measurements of generated videos and of a model's representations (``crepa eval``).

Pure metrics take arrays / tensors: :mod:`consistency`, :mod:`flicker`, :mod:`flow`,
:mod:`frechet`, :mod:`cknna`. Models and files live at the edges: :mod:`extractors`,
:mod:`layers`, :mod:`videos`, :mod:`report`.

The names below load on first use (lazy_loader): :mod:`crepa.eval.names` is read without torch.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "cknna": ["cknna", "unbiased_hsic"],
        "consistency": ["consistency_pair_scores", "consistency_score"],
        "evaluate": ["EvalResult", "evaluate_clips", "resolve_metrics"],
        "extractors": ["CallableExtractor", "FeatureExtractor", "TeacherExtractor", "load_extractor"],
        "flicker": ["temporal_flickering"],
        "flow": ["ClipMotion", "clip_motion", "optical_flow", "warping_errors"],
        "frechet": ["frechet_distance"],
        "layers": ["adjacent_frame_similarity", "block_cknna", "layer_similarity_profile"],
        "report": ["write_comparison", "write_eval_report", "write_layer_report"],
        "videos": ["find_clips"],
    },
)
