"""Gradient reduction: the handlers of the ops that start gradients and move them into this
rank's gradient shard.

Stages 0 and 1 keep persistent full gradients (``ZeroGrad`` zeroes them) and reduce them from
there; stages 2 and 3 start from no gradient (``DropGrads``), pack what autograd produced for a
unit into a flat buffer (the op's ``packs``), reduce it and let it go; on one rank
``WriteGradShard`` writes the gradients straight into the shard. The first reduction of a step
writes its unit's slice of the shard, later ones add to it, and the step's ``ZeroGradShard``
zeroes only what no reduction wrote. With streamed gradients a host unit lands in the gradient
buffer instead (``landings.py``), written once: ``AllocUnitGrad`` hands it the buffer.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from fzero.collectives import Communicator, DoneWork, Work, wait_all_unless_failed
from fzero.runtime.landings import GradientLandings
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace, alloc_storage, free_storage, is_allocated
from fzero.state.layout import FlatLayout


class Landing(enum.Enum):
    """How a finished reduction lands in the gradient shard."""

    WRITTEN = "written"  # already there (WriteGradShard)
    ADD = "add"  # this rank's slice of the sum: written the first time in a step, then added
    REPLACE = "replace"  # the whole sum (all-reduce): written over the slice
    FOLD = "fold"  # every rank's piece of the slice, added in rank order (deterministic)


class InFlightReduction(NamedTuple):
    """A reduction issued and not yet waited on. ``sent`` must live until the wait."""

    work: Work
    result: torch.Tensor | None
    landing: Landing
    sent: torch.Tensor | None


class ShardPlaces(NamedTuple):
    """Where one unit's gradients land in the gradient shard on one rank (``WriteGradShard``):
    each trainable parameter with its slot, shaped like it, and the unit's padding."""

    params: tuple[tuple[torch.nn.Parameter, torch.Tensor], ...]
    padding: torch.Tensor


class GradientReduction:
    """Owns the gradient buffers' life in a step: the reductions in flight and which units'
    slices of the gradient shard this step has written."""

    def __init__(
        self,
        layout: FlatLayout,
        workspace: Workspace,
        comm: Communicator,
        unit_params: list[list[torch.nn.Parameter]],
        reduce_dtype: torch.dtype,
        landings: GradientLandings,
    ):
        self.layout = layout
        self.landings = landings
        self.workspace = workspace
        self.comm = comm
        self.unit_params = unit_params
        self.reduce_dtype = reduce_dtype
        self.in_flight: dict[int, InFlightReduction] = {}
        self.shard_written: set[int] = set()
        # Views into the gradient shard, made once (slicing costs ~2 us a view): they stay
        # valid while the shard's storage is freed and allocated again between steps.
        self._places: dict[int, ShardPlaces] = {}
        self._places_storage = 0  # the shard's storage they view (its pointer, not its data's)
        self._buffer_places: dict[int, ShardPlaces] = {}  # the same, into the gradient buffer
        self._buffer_storage = 0
        # Units whose parameters' .grad are views into a persistent buffer (stages 0 and 1).
        self._grad_views = [
            (u.index, g)
            for u, g in zip(layout.units, workspace.grad_flats, strict=True)
            if g is not None
        ]

    # -- starting gradients -------------------------------------------------------------------

    def zero_grad(self, op: O.ZeroGrad) -> None:
        grad = self.workspace.grad_flats[op.unit]
        alloc_storage(grad)
        grad.zero_()

    def drop_grads(self, op: O.DropGrads) -> None:
        for param in self.trainable(op.unit):
            param.grad = None

    def alloc_grad(self, op: O.AllocGrad) -> None:
        # Autograd creates each gradient at the unit's first backward of the step and adds
        # later micro-batches into it; a persistent buffer is zeroed only if it is not alive.
        grad = self.workspace.grad_flats[op.unit]
        if grad is not None and not is_allocated(grad):
            alloc_storage(grad)
            grad.zero_()

    def restore_grad_views(self) -> None:
        """Point parameters' ``.grad`` back into their persistent gradient buffers (stages 0
        and 1) where a ``model.zero_grad()`` (or ``optimizer.zero_grad()``) set them to None, as
        Hugging Face's Trainer loop and many hand-written loops do between steps; autograd would
        otherwise accumulate into fresh tensors that no reduction reads."""
        for unit, grad in self._grad_views:
            for slot, param in zip(self.layout.units[unit].params, self.unit_params[unit]):
                if slot.requires_grad and param.grad is None:
                    param.grad = grad[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def trainable(self, unit: int) -> list[torch.nn.Parameter]:
        return [p for p in self.unit_params[unit] if p.requires_grad]

    # -- reductions -----------------------------------------------------------------------------

    def reduce_scatter(self, op: O.ReduceScatter) -> None:
        full = self._source(op.unit, op.packs)
        out = torch.empty(
            self.layout.units[op.unit].shard_numel, dtype=full.dtype, device=full.device
        )
        work = self.comm.reduce_scatter(out, full)
        self.in_flight[op.unit] = InFlightReduction(work, out, Landing.ADD, full)

    def all_reduce(self, op: O.AllReduce) -> None:
        full = self._source(op.unit, packs=False)
        work = self.comm.all_reduce(full)
        self.in_flight[op.unit] = InFlightReduction(work, full, Landing.REPLACE, None)

    def reduce_in_order(self, op: O.ReduceInOrder) -> None:
        # Cast to the reduce dtype even on one rank: the sum must not depend on the world size.
        full = self._source(op.unit, op.packs)
        world = self.comm.world_size
        if world == 1:
            self.in_flight[op.unit] = InFlightReduction(DoneWork(), full, Landing.FOLD, None)
            return
        if op.whole_unit:  # stage 0 owns whole units: it receives every rank's whole gradient
            out = torch.empty(world * full.numel(), dtype=full.dtype, device=full.device)
            work = self.comm.all_gather(out, full)
        else:
            out = torch.empty_like(full)
            work = self.comm.all_to_all(out, full)
        self.in_flight[op.unit] = InFlightReduction(work, out, Landing.FOLD, full)

    def write_grad_shard(self, op: O.WriteGradShard) -> None:
        """One rank: write or add each parameter's gradient into its place in the gradient
        shard, one pass per parameter with the cast folded in, and let it go."""
        places = self._shard_places(op.unit)
        first = self._first_landing(op.unit)
        targets, grads = [], []
        for param, view in places.params:
            grad = param.grad
            if grad is not None:
                targets.append(view)
                grads.append(grad)
            elif first:
                view.zero_()
            param.grad = None
        if first:
            places.padding.zero_()
        if targets:
            (torch._foreach_copy_ if first else torch._foreach_add_)(targets, grads)
        self.in_flight[op.unit] = InFlightReduction(DoneWork(), None, Landing.WRITTEN, None)

    def _first_landing(self, unit: int) -> bool:
        """Whether unit ``unit``'s gradient lands for the first time in this step (written, not
        added): in the gradient buffer, unless its earlier landings' sum was brought up into it
        (``GradFromHost``)."""
        if unit == self.landings.holder:
            return not self.landings.carried
        return unit not in self.shard_written

    def _shard_places(self, unit: int) -> ShardPlaces:
        """Unit ``unit``'s places where it lands (the gradient shard or the gradient buffer),
        which is allocated now (a view of freed storage cannot be made)."""
        space = self.landings.target(unit)
        storage = space.untyped_storage()._cdata
        if unit == self.landings.holder:
            if storage != self._buffer_storage:
                self._buffer_places, self._buffer_storage = {}, storage
            cache = self._buffer_places
        else:
            if storage != self._places_storage:  # a shard of its own: views of it made anew
                self._places, self._places_storage = {}, storage
            cache = self._places
        places = cache.get(unit)
        if places is None:
            u = self.layout.units[unit]
            params = tuple(
                (param, space[slot.offset : slot.offset + slot.numel].view(slot.shape))
                for slot, param in zip(u.params, self.unit_params[unit])
                # Frozen parameters lie past the optimizer space (requires_grad is checked
                # against the layout's at each step's start).
                if slot.requires_grad
            )
            padding = space[u.numel if u.trainable_numel == u.padded_numel else u.optimizer_numel :]
            places = cache[unit] = ShardPlaces(params, padding)
        return places

    def wait_reduce(self, op: O.WaitReduce) -> None:
        reduction = self.in_flight.pop(op.unit)
        reduction.work.wait()
        first = self._first_landing(op.unit)
        if op.unit != self.landings.holder:
            self.shard_written.add(op.unit)
        if reduction.landing is Landing.WRITTEN:
            return
        u = self.layout.units[op.unit]
        target = self.landings.target(op.unit)
        result = reduction.result
        if reduction.landing is Landing.FOLD:
            pieces = result.view(self.comm.world_size, -1)[:, : u.optimizer_numel]
            for rank, piece in enumerate(pieces):
                # The shard was never zeroed: the first piece of a step is copied.
                (target.copy_ if first and rank == 0 else target.add_)(piece)
            return
        source = result[: u.optimizer_numel]
        if reduction.landing is Landing.ADD and not first:
            target.add_(source)
        elif source.data_ptr() != target.data_ptr():  # stage 0 may reduce the shard in place
            # The first reduction of a step writes instead of adding: ZeroGradShard zeroes only
            # what no reduction wrote, before the optimizer reads it.
            target.copy_(source)

    def _source(self, unit: int, packs: bool) -> torch.Tensor:
        """The gradient a reduction sends, in the reduce dtype: the unit's persistent buffer,
        or (``packs``) its parameters' gradients packed into a fresh buffer."""
        if not packs:
            grad = self.workspace.grad_flats[unit]
            return grad if grad.dtype == self.reduce_dtype else grad.to(self.reduce_dtype)
        u = self.layout.units[unit]
        full = torch.empty(u.padded_numel, dtype=self.reduce_dtype, device=self.workspace.device)
        self._pack(unit, full)
        return full

    def _pack(self, unit: int, out: torch.Tensor) -> None:
        """Write unit ``unit``'s parameter gradients into ``out`` (its flat layout; the copy
        casts) and let them go; missing gradients, frozen parameters and padding read as 0."""
        layout_unit = self.layout.units[unit]
        targets, grads = [], []
        for slot, param in zip(layout_unit.params, self.unit_params[unit]):
            view = out[slot.offset : slot.offset + slot.numel]
            if param.requires_grad and param.grad is not None:
                targets.append(view)
                grads.append(param.grad.reshape(-1))
            else:
                view.zero_()
            param.grad = None
        out[layout_unit.numel :].zero_()
        if targets:
            torch._foreach_copy_(targets, grads)

    # -- the gradient shard ---------------------------------------------------------------------

    def alloc_grad_shard(self, op: O.AllocGradShard) -> None:
        shard = self.workspace.grad_shard
        if not is_allocated(shard):
            alloc_storage(shard)
            self.shard_written = set()

    def zero_grad_shard(self, op: O.ZeroGradShard) -> None:
        shard = self.workspace.grad_shard
        if not is_allocated(shard):
            alloc_storage(shard)
            self.shard_written = set()
        for u in self.layout.units:
            # Streamed gradients: the shard holds only the device units' part, at its start.
            within = u.optimizer_offset + u.optimizer_numel <= shard.numel()
            if u.optimizer_numel and within and u.index not in self.shard_written:
                shard[u.optimizer_offset : u.optimizer_offset + u.optimizer_numel].zero_()
                self.shard_written.add(u.index)

    def free_grad_shard(self, op: O.FreeGradShard) -> None:
        free_storage(self.workspace.grad_shard)
        self.shard_written = set()

    def alloc_unit_grad(self, op: O.AllocUnitGrad) -> None:
        self.landings.take(op.unit, op.buffer_nbytes)

    def free_grad_buffer(self, op: O.FreeGradBuffer) -> None:
        self.landings.free()

    # -- measuring and aborting -----------------------------------------------------------------

    def transient_grad_nbytes(self) -> int:
        """Bytes of gradients autograd produced outside persistent buffers, and of reduce
        inputs in flight."""
        grads = [
            p.grad
            for unit, params in enumerate(self.unit_params)
            if self.workspace.grad_flats[unit] is None
            for p in params
            if p.grad is not None
        ]
        grads += [r.sent for r in self.in_flight.values() if r.sent is not None]
        return sum(g.numel() * g.element_size() for g in grads)

    def abort(self, shard_persists: bool) -> None:
        """Wait for reductions in flight and clear this step's partial gradients;
        ``shard_persists``: the gradient shard lives across steps (zero it, do not free it)."""
        wait_all_unless_failed(reduction.work for reduction in self.in_flight.values())
        self.in_flight.clear()
        for unit, grad in enumerate(self.workspace.grad_flats):
            if grad is not None:
                grad.zero_()
            else:
                for param in self.trainable(unit):
                    param.grad = None
        if shard_persists:
            self.workspace.grad_shard.zero_()
        else:
            free_storage(self.workspace.grad_shard)
        self.landings.free()
        self.shard_written = set()
