"""The ``zero_optimization`` block of ``fzero.Config`` and its ``offload_param`` and
``offload_optimizer`` sub-blocks (DeepSpeed: ``deepspeed/runtime/zero/config.py``,
``offload_config.py``).

Field names and defaults are DeepSpeed's unless a docstring says otherwise; ``validate(path)``
checks ranges within the block and names the JSON path of a bad key (checks across blocks:
``validate.py``). Fields typed ``... | Auto`` hold the string ``"auto"`` until ``Config.resolve``
replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fzero.config.parse import DROPS_AUTO, Auto
from fzero.config.ranges import check_at_least, check_fraction
from fzero.errors import ConfigError

OffloadDevice = Literal["none", "cpu", "nvme"]


@dataclass(frozen=True)
class OffloadParamConfig:
    """``zero_optimization.offload_param``: where stage 3 keeps parameters between uses."""

    device: OffloadDevice = "none"
    nvme_path: str | None = None
    buffer_count: int = 5
    buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    pin_memory: bool = False

    def validate(self, path: str) -> None:
        _validate_offload(self, path)
        for name in ("buffer_size", "max_in_cpu"):
            check_at_least(f"{path}.{name}", getattr(self, name), 0)


@dataclass(frozen=True)
class OffloadOptimizerConfig:
    """``zero_optimization.offload_optimizer``: where optimizer state lives and steps."""

    device: OffloadDevice = "none"
    nvme_path: str | None = None
    buffer_count: int = 4
    pin_memory: bool = False
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    # Partial offload: the share of the optimizer state on the host, in [0, 1] (DeepSpeed's
    # meaning, fzero/schedule/offload_split.py; checked with the rest in fzero/offload/plan.py).
    ratio: float = 1.0
    super_offload: bool = False
    convert_grad_on_cpu: bool = True
    cpuadam_cores_perc: float = 0.8

    def validate(self, path: str) -> None:
        _validate_offload(self, path)
        check_fraction(f"{path}.ratio", self.ratio)
        check_fraction(f"{path}.cpuadam_cores_perc", self.cpuadam_cores_perc)


def _validate_offload(block: OffloadParamConfig | OffloadOptimizerConfig, path: str) -> None:
    if block.device not in ("none", "cpu", "nvme"):
        raise ConfigError(
            f"{path}.device", f'must be "none", "cpu" or "nvme", got {block.device!r}'
        )
    if block.device == "nvme" and not block.nvme_path:
        raise ConfigError(f"{path}.nvme_path", 'required when device is "nvme"')
    check_at_least(f"{path}.buffer_count", block.buffer_count, 0)


@dataclass(frozen=True)
class ZeroConfig:
    """The ``zero_optimization`` block. Sizes count elements, not bytes, as in DeepSpeed.

    ``overlap_comm`` defaults to true at every stage (DeepSpeed: true only for stage 3).
    """

    stage: int = 0
    reduce_bucket_size: int | Auto = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    stage3_prefetch_bucket_size: int | Auto = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_param_persistence_threshold: int | Auto = 100_000
    offload_optimizer: OffloadOptimizerConfig | None = None
    offload_param: OffloadParamConfig | None = None

    def validate(self, path: str = "zero_optimization") -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.stage", f"must be 0, 1, 2 or 3, got {self.stage}")
        for name in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
            "stage3_max_reuse_distance",
            "stage3_param_persistence_threshold",
        ):
            check_at_least(f"{path}.{name}", getattr(self, name), 0)
        if self.offload_optimizer is not None:
            self.offload_optimizer.validate(f"{path}.offload_optimizer")
        if self.offload_param is not None:
            self.offload_param.validate(f"{path}.offload_param")


DROPS_AUTO.update({ZeroConfig, OffloadParamConfig, OffloadOptimizerConfig})
