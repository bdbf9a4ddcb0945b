"""crepa: Cross-frame Representation Alignment for fine-tuning video diffusion transformers."""

from crepa.align import AlignmentSchedule, build_projector, cross_frame_alignment
from crepa.models import FAMILIES, BlockCapture, detect_family
from crepa.regularizer import CrepaConfig, CrepaOutput, CrepaRegularizer
from crepa.repvideo import RepVideoGates, install_repvideo

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "AlignmentSchedule",
    "BlockCapture",
    "CrepaConfig",
    "CrepaOutput",
    "CrepaRegularizer",
    "RepVideoGates",
    "__version__",
    "build_projector",
    "cross_frame_alignment",
    "detect_family",
    "install_repvideo",
]
