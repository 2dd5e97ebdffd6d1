"""PyTorch modules of LEGION (export stage only)."""

from .legion import LegionModel
from .sam import postprocess_masks_torch

__all__ = ["LegionModel", "postprocess_masks_torch"]
