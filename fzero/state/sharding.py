"""Sharding a model's values: each unit's values moved (or initialised) into this rank's flat
buffers one unit at a time, and the model's parameters pointed at views of them.

``build_workspace`` makes the ``Workspace`` (``buffers.py``) and the master weights of a
``fzero.shard``; ``bind_unit_views`` is how a parameter becomes a view of its unit's buffer.
"""

from __future__ import annotations

import torch
from torch import nn

from fzero.offload.host import HostBuffer
from fzero.state.buffers import Workspace, free_storage
from fzero.state.layout import Unit
from fzero.state.released import mark_released, name_params
from fzero.state.split import SplitFlat


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
        device=torch.device(device),
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
