"""crepa: Cross-frame Representation Alignment for fine-tuning video diffusion transformers.

The names below load on first use (lazy_loader), so ``import crepa`` and the ``crepa`` command's
``--help`` do not wait for torch and diffusers.
"""

import lazy_loader

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "align": ["AlignmentSchedule", "build_projector", "cross_frame_alignment"],
        "models": ["FAMILIES", "BlockCapture", "detect_family"],
        "regularizer": ["CrepaConfig", "CrepaOutput", "CrepaRegularizer"],
        "repvideo": ["RepVideoGates", "install_repvideo"],
    },
)
__all__ += ["__version__"]
