"""The flat tensors one rank holds, and the parameter/gradient views into them.

``ZeroState`` (the pytree) holds the optimizer's buffers; ``Workspace`` holds what is derived
from them or only alive during a step: each unit's full parameter buffer (the gathered one,
which model parameters are views into) and its gradient buffer (which ``param.grad`` are views
into). Stage 3 frees a unit's parameter storage between uses by resizing it to zero bytes; the
views stay valid objects and see the data again when the storage is refilled in place, which is
also why autograd's saved tensors keep working across a release and a re-gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fzero.offload.host import HostBuffer
from fzero.state.layout import FlatLayout
from fzero.state.split import SplitFlat


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
    """Where this rank's parameter values live besides the fp32 master shard.

    - Stage 0: ``param_shard`` is one contiguous compute-dtype buffer of whole units (the
      master itself in fp32), and the unit buffers are views into it.
    - Stages 1 and 2: each unit's full buffer persists; this rank's shard is its own slice of
      it, so the gathers after the optimizer step run in place and the shard costs no copy.
    - Stage 3: no compute-dtype shard is kept. A gather casts the master slice on the fly
      (frozen parameters, which have no master, keep their values in ``frozen_tails``), which
      saves 2 bytes per parameter over keeping a bf16 copy and costs one cast per gather.
      Under offload the master is on the host, so stage 3 keeps ``param_shard`` as stage 0
      does (this rank's compute-dtype shards back to back): on the device for optimizer
      offload, in host memory for parameter offload (``host_shards``; under partial offload
      the device units' part is copied there after their device step, ``host_copy_out``).
    """

    layout: FlatLayout
    stage: int
    master: torch.Tensor | SplitFlat  # split in two under partial optimizer offload
    param_flats: list[torch.Tensor]  # per unit, compute dtype, padded length
    # Per unit, compute dtype, stages 0 and 1 only (the persistent full gradients); None for
    # frozen units and in stages 2 and 3, where autograd's own gradients are packed at reduction.
    grad_flats: list[torch.Tensor | None]
    param_shard: torch.Tensor | None  # stage 0 only
    frozen_tails: list[torch.Tensor]  # stage 3 only: per unit, the shard past the master part
    # This rank's optimizer space, gradient-accumulation dtype (streamed gradients: only its
    # first elements, the device units' part; see sharding.build_workspace).
    grad_shard: torch.Tensor
    # Offload: the (pinned) host buffers the tensors above may live in, kept alive here.
    host_buffers: list[HostBuffer] = field(default_factory=list)
    # Parameter offload (stage 3): ``param_shard`` is in host memory, whatever the device.
    host_shards: bool = False
    # Where this rank computes (gathers, reductions, the loss). Under offload ``master`` lives
    # in host memory, so its device is not this one.
    device: torch.device = torch.device("cpu")

    def _master_part(self, index: int) -> torch.Tensor:
        unit = self.layout.units[index]
        return self.master[unit.optimizer_offset : unit.optimizer_offset + unit.optimizer_numel]

    def standing_shard(self, index: int) -> torch.Tensor | None:
        """The compute-dtype shard of unit ``index`` kept in memory (stages 0-2), else None."""
        unit = self.layout.units[index]
        if self.param_shard is not None:
            return self.param_shard[unit.shard_offset : unit.shard_offset + unit.shard_numel]
        if self.stage in (1, 2):
            lo, hi = self.layout.owned_range(unit)
            return self.param_flats[index][lo:hi]
        return None

    def gather_source(self, index: int) -> torch.Tensor:
        """This rank's compute-dtype shard of unit ``index``: what its all-gather sends. In
        stage 3 it is assembled from the master (a view when no cast or frozen tail is needed)."""
        shard = self.standing_shard(index)
        if shard is not None:
            return shard
        master, tail = self._master_part(index), self.frozen_tails[index]
        dtype = self.param_flats[index].dtype
        if tail.numel() == 0 and master.dtype == dtype:
            return master
        out = torch.empty(master.numel() + tail.numel(), dtype=dtype, device=master.device)
        self.write_shard(index, out)
        return out

    def write_shard(self, index: int, out: torch.Tensor) -> None:
        """Write this rank's compute-dtype shard of unit ``index`` into ``out`` (one pass, the
        cast included): a one-rank gather needs nothing else."""
        shard = self.standing_shard(index)
        if shard is not None:
            if shard.data_ptr() != out.data_ptr():
                out.copy_(shard)
            return
        master = self._master_part(index)
        out[: master.numel()].copy_(master)
        out[master.numel() :].copy_(self.frozen_tails[index])

    def owned_fp32(self, index: int) -> torch.Tensor:
        """This rank's shard of unit ``index`` in fp32: master values where they exist."""
        unit = self.layout.units[index]
        out = torch.empty(unit.shard_numel, dtype=torch.float32, device=self.master.device)
        shard = self.standing_shard(index)
        if shard is not None:
            out.copy_(shard)
        else:
            out[unit.optimizer_numel :].copy_(self.frozen_tails[index])
        out[: unit.optimizer_numel] = self._master_part(index)
        return out

    def param_out(self, index: int) -> torch.Tensor | None:
        """Where the optimizer writes unit ``index``'s updated compute-dtype values, or None
        when nothing is kept besides the master (stage 3, or stage 0 in fp32), or when the
        device step cannot write them (``host_copy_out``)."""
        if self.host_copy_out(index) is not None:
            return None
        shard = self.standing_shard(index)
        if shard is None or shard.data_ptr() == self._master_part(index).data_ptr():
            return None
        return shard[: self.layout.units[index].optimizer_numel]

    def host_copy_out(self, index: int) -> torch.Tensor | None:
        """Partial offload with parameter offload: a device unit's slice of the host shard, which
        ``CopyParamsToHost`` writes after the device step (its kernel writes device memory
        only). None for every other unit."""
        unit = self.layout.units[index]
        on_device = isinstance(self.master, SplitFlat) and (
            unit.optimizer_offset + unit.optimizer_numel <= self.master.split_numel
        )
        if not (self.host_shards and on_device and unit.optimizer_numel):
            return None
        return self.param_shard[unit.shard_offset : unit.shard_offset + unit.optimizer_numel]

    @property
    def shards_on_host(self) -> bool:
        """Parameter offload: this rank's compute-dtype shards live in host memory."""
        return (
            self.param_shard is not None
            and self.param_shard.device.type == "cpu"
            and (self.grad_shard.device.type != "cpu")
        )

    @property
    def gathers_params(self) -> bool:
        """Whether the full unit buffers are gathered copies of sharded parameters (stage 3)
        rather than this rank's standing parameters (stages 0-2)."""
        return self.stage == 3

    def state_leaves(self) -> tuple[torch.Tensor, ...]:
        """Parameter values a checkpoint needs beyond the master: the compute-dtype shards
        (stages 0-2, and stage 3 under offload, unless they are the master) or the frozen
        tails (stage 3)."""
        if self.stage == 3 and self.param_shard is None:
            return tuple(self.frozen_tails)
        if self.param_shard is self.master:
            return ()
        return tuple(self.standing_shard(u.index) for u in self.layout.units)
