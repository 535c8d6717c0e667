"""Partial optimizer offload (``zero_optimization.offload_optimizer.ratio``): which units'
optimizer state lives and steps on the host, and which on the device.

The split is made at unit granularity, so the schedule can say per unit where it steps. Walking
the units in the layout's order, the first units whose cumulative optimizer elements stay within
``(1 - ratio)`` of this rank's optimizer shard are *device units*; the rest are *host units*.
That is DeepSpeed's rule (``stage3.py`` keeps the first ``int((1 - ratio) * n)`` of its ``n``
sub-groups on the accelerator and gives the rest to CPU Adam) weighed by elements instead of
counted in sub-groups, since fzero's units differ in size: the host's share is rounded up to a
whole unit, so it is at least ``ratio`` (``host_fraction`` says what it came to). Keeping the last
units on the host also suits the step: their gradients come down first in the backward, and at
stage 3 their CPU steps in the next forward run while the device units before them compute.

Because device units come first, this rank's optimizer space splits at one offset: elements
``[0, device_numel)`` on the device, ``[device_numel, total)`` on the host. Each rank splits its
own shard: ranks whose shards hold different trainable counts (a unit with frozen parameters)
may split at different units, which changes none of the collectives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class OffloadSplit:
    """Where each unit's optimizer state lives: ``host_units`` on the host, the others on the
    device. ``device_numel`` elements of the optimizer space are on the device (the first),
    ``total_numel - device_numel`` on the host."""

    ratio: float
    host_units: frozenset[int]
    device_units: frozenset[int]
    device_numel: int
    total_numel: int

    @property
    def host_numel(self) -> int:
        return self.total_numel - self.device_numel

    @property
    def host_fraction(self) -> float:
        """The share of this rank's optimizer elements on the host (1.0 for an empty shard)."""
        return self.host_numel / self.total_numel if self.total_numel else 1.0

    @property
    def is_partial(self) -> bool:
        """Both parts hold elements: the state has a host part and a device part."""
        return 0 < self.device_numel < self.total_numel

    def __str__(self) -> str:
        return (
            f"offload_optimizer.ratio {self.ratio:g}: {self.host_numel:,} of "
            f"{self.total_numel:,} optimizer elements on the host ({self.host_fraction:.1%}, "
            f"units {_units_text(self.host_units)}), {self.device_numel:,} on the device "
            f"(units {_units_text(self.device_units)})"
        )


def split_units(units: Iterable[tuple[int, int]], ratio: float) -> OffloadSplit:
    """The split of ``units``, ``(index, optimizer_numel)`` pairs in the layout's order whose
    optimizer ranges follow each other, for ``ratio`` in [0, 1] (see the module docstring)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"offload ratio must lie in [0, 1], got {ratio}")
    units = list(units)
    total = sum(numel for _, numel in units)
    budget = (1.0 - ratio) * total  # device elements allowed
    if ratio > 0:  # some element goes to the host, however small the ratio (1 - ratio may be 1)
        budget = min(budget, total - 1)
    device: set[int] = set()
    device_numel = 0
    for index, numel in units:
        if device_numel + numel > budget:
            break
        device.add(index)
        device_numel += numel
    host = frozenset(index for index, _ in units if index not in device)
    return OffloadSplit(ratio, host, frozenset(device), device_numel, total)


def _units_text(indices: frozenset[int]) -> str:
    """``0-3, 5``: sorted indices with consecutive runs joined."""
    if not indices:
        return "none"
    ordered = sorted(indices)
    runs: list[list[int]] = [[ordered[0], ordered[0]]]
    for index in ordered[1:]:
        if index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
