"""Pure tensor math of representation alignment: no files, no models."""

from crepa.align.grids import latent_frame_features, resample_grid, tokens_to_grid, valid_frame_counts_near
from crepa.align.loss import AlignmentResult, cross_frame_alignment, neighbour_offsets
from crepa.align.projector import build_projector
from crepa.align.schedule import AlignmentSchedule
from crepa.align.settings import CrepaConfig

__all__ = [
    "AlignmentResult",
    "AlignmentSchedule",
    "CrepaConfig",
    "build_projector",
    "cross_frame_alignment",
    "latent_frame_features",
    "neighbour_offsets",
    "resample_grid",
    "tokens_to_grid",
    "valid_frame_counts_near",
]
