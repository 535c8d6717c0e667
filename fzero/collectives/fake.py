"""A fake world: this process plays rank 0 of N ranks that do not exist.

Collectives only produce correctly shaped results (a gather repeats this rank's shard, a
reduction keeps this rank's own contribution), so a real step runs on one device with the
buffers, shard sizes and memory of one rank of N. Numbers trained this way are meaningless;
the memory and the time spent outside communication are real. Use it to measure the per-rank
peak memory of a world size you do not have: ``fzero.shard(model, stage=3,
simulate_world_size=64)``.
"""

from __future__ import annotations

from typing import Any

import torch

from fzero.collectives.base import (
    DoneWork,
    Work,
    check_all_to_all_sizes,
    check_gather_sizes,
    check_scatter_sizes,
)


class FakeWorld:
    rank = 0
    simulated = True  # no peers: cross-rank checks have nobody to compare with

    def __init__(self, world_size: int):
        if world_size < 1:
            raise ValueError(f"simulate_world_size must be >= 1, got {world_size}")
        self.world_size = world_size

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> Work:
        check_gather_sizes(self, output, shard)
        output.view(self.world_size, -1).copy_(shard.view(1, -1).expand(self.world_size, -1))
        return DoneWork()

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_scatter_sizes(self, output, full)
        output.copy_(full[: output.numel()])
        return DoneWork()

    def all_reduce(self, tensor: torch.Tensor) -> Work:
        return DoneWork()

    def all_to_all(self, output: torch.Tensor, full: torch.Tensor) -> Work:
        check_all_to_all_sizes(self, output, full)
        mine = full.view(self.world_size, -1)[:1]  # every rank "sends" this rank's own slice
        output.view(self.world_size, -1).copy_(mine.expand(self.world_size, -1))
        return DoneWork()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj] * self.world_size
