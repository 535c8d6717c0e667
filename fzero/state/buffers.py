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
from torch import nn

from fzero.offload.host import HostBuffer
from fzero.state.layout import FlatLayout, Unit
from fzero.state.released import mark_released, name_params
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
    # first elements, the device units' part; see build_workspace).
    grad_shard: torch.Tensor
    # Offload: the (pinned) host buffers the tensors above may live in, kept alive here.
    host_buffers: list[HostBuffer] = field(default_factory=list)
    # Parameter offload (stage 3): ``param_shard`` is in host memory, whatever the device.
    host_shards: bool = False

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


def bind_unit_views(
    unit: Unit, params: list[nn.Parameter], flat: torch.Tensor, grad_flat: torch.Tensor | None
) -> None:
    """Point every parameter's ``.data`` (and ``.grad``, when trainable) of ``unit`` into its
    flat buffers. Parameter objects keep their identity, so tied parameters stay tied, and the
    model's own storage is released as soon as nothing else refers to it."""
    name_params(params, (slot.names[0] for slot in unit.params))
    for slot, param in zip(unit.params, params):
        param.data = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        # With a gradient buffer (stages 0, 1) autograd accumulates into views of it; without
        # (stages 2, 3) each backward hands the parameter a fresh gradient.
        param.grad = (
            grad_flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            if slot.requires_grad and grad_flat is not None
            else None
        )


def build_workspace(
    layout,
    params_per_unit,
    stage,
    comm,
    device,
    compute_dtype,
    accum_dtype,
    ordered=False,
    persistent=frozenset(),
    initializer=None,
    *,
    host_master=False,
    host_shards=False,
    pin_memory=False,
    device_master_numel=0,
    files=None,
    grad_shard_numel=None,
):
    """Move the model's values into flat buffers (rank 0's values win), one unit at a time, and
    point the parameters there; each unit's original storage is released before the next one
    is copied, so sharding needs about one unit of memory beyond the model itself.
    ``ordered`` (deterministic mode): stage 0's gradient shard is an accumulator of its own,
    alive only during a step, as in stages 1-3. ``persistent``: stage-3 units whose gathered
    buffer is kept. ``initializer`` (a ``materialize.UnitInitializer``, for a model on the meta
    device): computes each unit's values in place of copying them; every rank computes the same
    values, so nothing is broadcast.

    Offload: ``host_master`` puts the master in host memory (the optimizer steps there; pinned
    with ``pin_memory``); stage 3 then keeps a compute-dtype shard for its gathers to read, on
    the device, or on the host with ``host_shards`` (parameter offload). Host buffers stay
    alive in ``workspace.host_buffers``. ``device_master_numel`` (partial offload): the first
    elements of the master, the device units', stay on the device (a ``SplitFlat``). ``files``
    (NVMe offload, a ``FileResidence``): the master and the parameter shard it holds are its
    file-backed tensors instead. ``grad_shard_numel`` (streamed gradients under optimizer
    offload, ``fzero/schedule/streamed_grads.py``): the gradient shard covers only the first
    elements of the optimizer space, the device units' (0 under full offload), since host units'
    gradients land in a buffer of their own; None: all of it."""
    host_buffers: list[HostBuffer] = []

    def host_zeros(numel: int, dtype: torch.dtype, name: str) -> torch.Tensor:
        if files is not None and files.holds(name):
            return files.tensor(name)  # a new file: zeros
        host_buffers.append(HostBuffer(numel, dtype, pin_memory=pin_memory))
        return host_buffers[-1].tensor.zero_()

    if host_master and 0 < device_master_numel < layout.optimizer_numel:
        master = SplitFlat(
            torch.zeros(device_master_numel, dtype=torch.float32, device=device),
            host_zeros(layout.optimizer_numel - device_master_numel, torch.float32, "master"),
        )
    elif host_master:
        master = host_zeros(layout.optimizer_numel, torch.float32, "master")
    else:
        master = torch.zeros(layout.optimizer_numel, dtype=torch.float32, device=device)
    no_frozen = layout.optimizer_numel == layout.shard_numel
    param_shard = None
    if stage == 0:  # fp32 with nothing frozen: the master is the parameter buffer
        if compute_dtype == torch.float32 and no_frozen:
            param_shard = master
        else:
            param_shard = torch.zeros(layout.shard_numel, dtype=compute_dtype, device=device)
    standing_stage3 = stage == 3 and (host_master or host_shards)
    if standing_stage3 and host_shards:
        param_shard = host_zeros(layout.shard_numel, compute_dtype, "param_shard")
    elif standing_stage3:
        param_shard = torch.zeros(layout.shard_numel, dtype=compute_dtype, device=device)
    aliased_grads = stage == 0 and accum_dtype == compute_dtype and no_frozen and not ordered
    if grad_shard_numel is None:
        grad_shard_numel = layout.optimizer_numel
    grad_shard = torch.zeros(grad_shard_numel, dtype=accum_dtype, device=device)
    param_flats, grad_flats, frozen_tails = [], [], []
    scratch = _init_scratch(layout, stage, persistent, device) if initializer is not None else None
    for unit, params in zip(layout.units, params_per_unit):
        in_scratch = scratch is not None and stage == 3 and unit.index not in persistent
        if in_scratch:
            flat = scratch[: unit.padded_numel].zero_()
        else:
            flat = torch.zeros(unit.padded_numel, dtype=torch.float32, device=device)
        if initializer is not None:
            initializer.fill(unit, params, flat)
        else:
            for slot, param in zip(unit.params, params):
                flat[slot.offset : slot.offset + slot.numel] = param.detach().reshape(-1).float()
            comm.broadcast(flat, src=0)
        lo, _ = layout.owned_range(unit)
        opt = slice(unit.optimizer_offset, unit.optimizer_offset + unit.optimizer_numel)
        master[opt].copy_(flat[lo : lo + unit.optimizer_numel])
        if stage == 0:  # shards are whole units: the unit buffer is a view into the shard
            span = slice(unit.shard_offset, unit.shard_offset + unit.shard_numel)
            if param_shard is not master:
                param_shard[span] = flat
            param_flats.append(param_shard[span])
        elif in_scratch:  # released below: its memory is never touched
            param_flats.append(torch.empty(unit.padded_numel, dtype=compute_dtype, device=device))
        else:
            param_flats.append(flat.to(compute_dtype))
        if standing_stage3:
            span = slice(unit.shard_offset, unit.shard_offset + unit.shard_numel)
            param_shard[span] = flat[lo : lo + unit.shard_numel]
        elif stage == 3:
            tail = flat[lo + unit.optimizer_numel : lo + unit.shard_numel]
            frozen_tails.append(tail.to(compute_dtype, copy=True))
        if not unit.has_trainable or stage >= 2:  # stages 2, 3: autograd's own gradients
            grad_flats.append(None)
        elif aliased_grads:
            grad_flats.append(grad_shard[opt])
        else:
            grad_flats.append(torch.zeros(unit.padded_numel, dtype=compute_dtype, device=device))
        del flat
        bind_unit_views(unit, params, param_flats[-1], grad_flats[-1])
        # The views exist now: stage 3 frees the gathered parameters between uses.
        if stage == 3 and unit.index not in persistent:
            free_storage(param_flats[-1])
            mark_released(params)
    del scratch
    if stage >= 1 or ordered:  # alive only from a step's first reduction to its optimizer step
        free_storage(grad_shard)
    workspace = Workspace(
        layout,
        stage,
        master,
        param_flats,
        grad_flats,
        param_shard,
        frozen_tails,
        grad_shard,
        host_buffers,
        host_shards=standing_stage3 and host_shards,
    )
    return workspace, master


def _init_scratch(layout, stage, persistent, device) -> torch.Tensor | None:
    """One fp32 buffer, as long as the largest stage-3 unit that is released, in which every
    such unit of a meta-device model is initialised in turn. A buffer of its own per unit, freed
    right after, costs no more in principle, but the host allocator keeps freed blocks of a size
    it has seen in its heap (glibc's adaptive mmap threshold), so the resident set would grow by
    a unit per unit, to the size of the model."""
    if stage != 3:
        return None
    released = [u.padded_numel for u in layout.units if u.index not in persistent]
    if not released:
        return None
    return torch.empty(max(released), dtype=torch.float32, device=device)
