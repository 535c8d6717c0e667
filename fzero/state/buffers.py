"""The flat tensors one rank holds, and the parameter/gradient views into them.

``ZeroState`` (the pytree) holds the optimizer's buffers; ``Workspace`` holds what is derived
from them or only alive during a step: each unit's full parameter buffer (the gathered one,
which model parameters are views into) and its gradient buffer (which ``param.grad`` are views
into). Stage 3 frees a unit's parameter storage between uses by resizing it to zero bytes; the
views stay valid objects and see the data again when the storage is refilled in place, which is
also why autograd's saved tensors keep working across a release and a re-gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fzero.state.layout import FlatLayout


def free_storage(tensor: torch.Tensor) -> None:
    """Give back ``tensor``'s memory; it must own its whole storage (never a view into a larger
    buffer, whose other users would lose their data too)."""
    storage = tensor.untyped_storage()
    if storage.size() == 0:
        return
    if tensor.storage_offset() != 0 or storage.size() != tensor.numel() * tensor.element_size():
        raise RuntimeError("fzero: refusing to free a tensor that shares its storage")
    storage.resize_(0)


def alloc_storage(tensor: torch.Tensor) -> None:
    """Give a freed tensor its memory back (contents undefined); a no-op when it has memory."""
    storage = tensor.untyped_storage()
    if storage.size() == 0:
        storage.resize_(tensor.numel() * tensor.element_size())


def is_allocated(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().size() != 0


@dataclass(repr=False)
class Workspace:
    """``param_shard`` is one contiguous compute-dtype buffer of this rank's shard space in
    stages 0 and 3 (stage 0's unit buffers are views into it), and None in stages 1 and 2, where
    each unit's full buffer persists and this rank's shard is its own slice of it (the gathers
    run in place, so the shard costs no second copy)."""

    layout: FlatLayout
    param_flats: list[torch.Tensor]  # per unit, compute dtype, padded length
    grad_flats: list[torch.Tensor | None]  # per unit, compute dtype; None for frozen units
    param_shard: torch.Tensor | None
    grad_shard: torch.Tensor  # this rank's optimizer space, gradient-accumulation dtype

    def unit_param_shard(self, index: int) -> torch.Tensor:
        """This rank's compute-dtype slice of unit ``index``: what its all-gather sends."""
        unit = self.layout.units[index]
        if self.param_shard is not None:
            return self.param_shard[unit.shard_offset : unit.shard_offset + unit.shard_numel]
        lo, hi = self.layout.owned_range(unit)
        return self.param_flats[index][lo:hi]


def bind_views(
    layout: FlatLayout,
    params_per_unit: list[list[nn.Parameter]],
    param_flats: list[torch.Tensor],
    grad_flats: list[torch.Tensor | None],
) -> None:
    """Point every parameter's ``.data`` (and ``.grad``, when trainable) into its unit's flat
    buffers. Parameter objects keep their identity, so tied parameters stay tied."""
    for unit, params, flat, grad_flat in zip(
        layout.units, params_per_unit, param_flats, grad_flats
    ):
        for slot, param in zip(unit.params, params):
            view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            param.data = view
            if slot.requires_grad:
                assert grad_flat is not None
                param.grad = grad_flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
