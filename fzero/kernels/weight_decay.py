"""Weight decay per range of a flat shard: ``WeightDecaySegments`` and its device table.

A flat shard holds many parameters, and biases and norms usually get no weight decay, so the
decay of an AdamW step is given per range of the shard. ``WeightDecaySegments`` holds those
ranges, checked once per layout; the CUDA kernel reads them as a ``SegmentTable`` on the device,
the torch paths clip them to the chunk they update (``within``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class SegmentTable(NamedTuple):
    """The device-side form of ``WeightDecaySegments``: a kernel program finds the segment its
    first element lies in by bisecting ``segment_starts`` in ``search_steps`` steps, then walks
    forward over the segments that start inside its block.

    ``segment_starts`` ends with ``numel``, a sentinel no element reaches, so the walk needs no
    bound. The table grows with the number of segments (a few per parameter at most), not with
    the shard: a per-block table would cost 4 bytes per 1024 elements, megabytes for a billion
    parameters, held for the whole run.
    """

    segment_starts: torch.Tensor  # int64 [segments + 1]
    segment_decays: torch.Tensor  # float64 [segments]
    search_steps: int  # ceil(log2(segments)): bisection steps from [0, segments) to one


@dataclass(frozen=True)
class WeightDecaySegments:
    """Weight decay per range of a flat shard of ``numel`` elements.

    ``ranges`` holds ``(start, end, weight_decay)``: sorted, contiguous, non-empty, covering
    ``[0, numel)``, with neighbours of equal decay merged. Build it once per layout with
    ``from_ranges``; the device tables a kernel reads are built on first use and cached per device
    and block size, so steps after the first copy nothing to the device.
    """

    ranges: tuple[tuple[int, int, float], ...]
    numel: int
    _device_tables: dict[torch.device, SegmentTable] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _validate_ranges(self.ranges, self.numel)

    @classmethod
    def from_ranges(
        cls, ranges: tuple[tuple[int, int, float], ...] | list, numel: int
    ) -> WeightDecaySegments:
        """Validate ``ranges`` against ``[0, numel)``, drop empty ones and merge equal neighbours.

        Raises ``ValueError`` naming the offending range for gaps, overlaps, reversed ranges and
        negative or non-finite decay.
        """
        cleaned = [(int(start), int(end), float(decay)) for start, end, decay in ranges]
        for index, (start, end, decay) in enumerate(cleaned):
            if end < start:
                raise ValueError(
                    f"weight-decay range {index} {ranges[index]} ends before it starts"
                )
            if not (math.isfinite(decay) and decay >= 0):
                raise ValueError(
                    f"weight-decay range {index} {ranges[index]} has weight decay {decay}; "
                    "it must be finite and >= 0"
                )
        # Empty ranges (a parameter with no elements in this shard) carry no information.
        merged: list[tuple[int, int, float]] = []
        for start, end, decay in (r for r in cleaned if r[0] < r[1]):
            if merged and merged[-1][1] == start and merged[-1][2] == decay:
                merged[-1] = (merged[-1][0], end, decay)
            else:
                merged.append((start, end, decay))
        return cls(tuple(merged), int(numel))

    @classmethod
    def uniform(cls, numel: int, weight_decay: float) -> WeightDecaySegments:
        """One decay for the whole shard (no ranges at all for an empty one)."""
        return cls.from_ranges([(0, numel, weight_decay)] if numel else [], numel)

    def within(self, start: int, end: int) -> list[tuple[int, int, float]]:
        """The ranges clipped to ``[start, end)`` and shifted to start at 0."""
        first = bisect.bisect_right(self.ranges, start, key=lambda r: r[0]) - 1
        clipped = []
        for range_start, range_end, decay in self.ranges[max(first, 0) :]:
            if range_start >= end:
                break
            clipped.append((max(range_start, start) - start, min(range_end, end) - start, decay))
        return clipped

    def device_table(self, device: torch.device) -> SegmentTable:
        """The kernel's table on ``device``; built once, cached."""
        key = torch.device(device)
        table = self._device_tables.get(key)
        if table is None:
            starts = [r[0] for r in self.ranges] + [self.numel]
            table = SegmentTable(
                torch.tensor(starts, dtype=torch.int64, device=device),
                torch.tensor([r[2] for r in self.ranges], dtype=torch.float64, device=device),
                max(len(self.ranges) - 1, 0).bit_length(),
            )
            self._device_tables[key] = table
        return table


def _validate_ranges(ranges: tuple[tuple[int, int, float], ...], numel: int) -> None:
    if numel < 0:
        raise ValueError(f"a shard cannot have numel {numel}")
    expected_start = 0
    for index, (start, end, decay) in enumerate(ranges):
        where = f"weight-decay range {index} {(start, end, decay)}"
        if start > expected_start:
            raise ValueError(f"{where} leaves a gap [{expected_start}, {start}) with no decay")
        if start < expected_start:
            raise ValueError(
                f"{where} overlaps the range before it, which ends at {expected_start}"
            )
        if end <= start:
            raise ValueError(f"{where} is empty or reversed")
        if not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"{where} has weight decay {decay}; it must be finite and >= 0")
        expected_start = end
    if expected_start != numel:
        last = f"range {len(ranges) - 1} {ranges[-1]}" if ranges else "no range"
        raise ValueError(
            f"weight-decay ranges end at {expected_start} ({last}) but the shard has numel {numel}"
        )
