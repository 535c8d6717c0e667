"""Fused device kernels for the optimizer step: AdamW over one flat shard.

``adamw`` holds ``adamw_step``, which picks the path by device; ``adamw_triton`` the CUDA
kernel; ``cpu_adamw`` a host AdamW that folds the compute-dtype cast into its pass (measured
against torch's fused CPU kernel, which the offload step uses, in ``benchmarks/cpu_adamw.py``);
``adamw_reference`` the torch oracle and ``weight_decay`` the per-range decay table they all
read. Importing this package needs only torch: the Triton kernels load on first CUDA use.
"""

from __future__ import annotations

from fzero.kernels.adamw import adamw_step
from fzero.kernels.adamw_reference import adamw_reference
from fzero.kernels.weight_decay import WeightDecaySegments

__all__ = ["WeightDecaySegments", "adamw_reference", "adamw_step"]
