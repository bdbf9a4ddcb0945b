"""Model families (a registry of data) and model-agnostic block capture."""

from crepa.models.capture import BlockCapture
from crepa.models.registry import FAMILIES, ModelFamily, bind_call, detect_family, get_family

__all__ = ["FAMILIES", "BlockCapture", "ModelFamily", "bind_call", "detect_family", "get_family"]
