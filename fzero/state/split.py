"""SplitFlat: one flat optimizer buffer (master weights or a moment) held in two parts, under
partial optimizer offload (``offload_optimizer.ratio`` < 1, ``fzero/schedule/offload_split.py``).

The device units come first in the optimizer space, so elements ``[0, split_numel)`` live in
``on_device`` and ``[split_numel, numel)`` in ``on_host``. ``ZeroState.master``, ``exp_avg`` and
``exp_avg_sq`` are a ``SplitFlat`` then, never a partial tensor: ``full()`` is the whole buffer
(one host copy, what checkpoints write), and indexing with a slice that lies inside one part,
such as a unit's optimizer range, returns a view of that part, so the readers that work unit by
unit (loading, ``load_pretrained``, the optimizers) read and write it as they would a tensor. A
slice across the split raises. Both parts are pytree leaves: a ``tree_map`` copy copies both.
"""

from __future__ import annotations

from dataclasses import dataclass

import optree
import torch


@dataclass(frozen=True, eq=False)
class SplitFlat:
    on_device: torch.Tensor  # optimizer elements [0, split_numel): the device units'
    on_host: torch.Tensor  # optimizer elements [split_numel, numel): the host units'

    @property
    def split_numel(self) -> int:
        return self.on_device.numel()

    def numel(self) -> int:
        return self.on_device.numel() + self.on_host.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.on_device.dtype

    @property
    def device(self) -> torch.device:
        """The device part's device: where the model computes (the host part is in memory)."""
        return self.on_device.device

    @property
    def is_cuda(self) -> bool:
        return self.on_device.is_cuda

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.on_device, self.on_host

    def full(self) -> torch.Tensor:
        """The whole buffer, concatenated in host memory (a copy)."""
        return torch.cat([self.on_device.detach().cpu(), self.on_host.detach().cpu()])

    def __getitem__(self, span: slice) -> torch.Tensor:
        start, stop, step = span.indices(self.numel())
        if step != 1:
            raise IndexError("SplitFlat takes contiguous slices only")
        split = self.split_numel
        if stop <= split:
            return self.on_device[start:stop]
        if start >= split:
            return self.on_host[start - split : stop - split]
        raise IndexError(
            f"elements [{start}, {stop}) cross the split at {split} between the device part and "
            "the host part; read each part (or full()) instead"
        )

    def __repr__(self) -> str:
        return (
            f"SplitFlat({self.split_numel:,} on {self.on_device.device}, "
            f"{self.on_host.numel():,} on the host, {str(self.dtype).removeprefix('torch.')})"
        )


def flat_parts(buffer: torch.Tensor | SplitFlat) -> tuple[torch.Tensor, ...]:
    """The tensors ``buffer`` is made of: itself, or a split buffer's two parts."""
    return buffer.parts() if isinstance(buffer, SplitFlat) else (buffer,)


def as_flat(buffer: torch.Tensor | SplitFlat) -> torch.Tensor:
    """``buffer`` as one flat tensor: itself, or a split buffer's parts joined on the host."""
    return buffer.full() if isinstance(buffer, SplitFlat) else buffer


def map_parts(buffer: torch.Tensor | SplitFlat, fn) -> torch.Tensor | SplitFlat:
    """``fn`` applied to each of ``buffer``'s tensors, rebuilt in the same shape."""
    if isinstance(buffer, SplitFlat):
        return SplitFlat(fn(buffer.on_device), fn(buffer.on_host))
    return fn(buffer)


def _flatten(buffer: SplitFlat):
    return buffer.parts(), None, ("on_device", "on_host")


optree.register_pytree_node(
    SplitFlat, _flatten, lambda _, children: SplitFlat(*children), namespace="fzero"
)
