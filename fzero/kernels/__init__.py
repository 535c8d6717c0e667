"""Fused device kernels for the optimizer step.

Importing this package needs only torch: the Triton kernels load on first CUDA use.
"""

from __future__ import annotations

from fzero.kernels.adamw import WeightDecaySegments, adamw_reference, adamw_step

__all__ = ["WeightDecaySegments", "adamw_reference", "adamw_step"]
