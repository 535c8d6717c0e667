"""Where a unit's reduced gradient lands on the device: its slice of the gradient shard, or,
with streamed gradients (``fzero/schedule/streamed_grads.py``), the gradient buffer while the
unit holds it (from its ``AllocUnitGrad`` to the next unit's).

With gradient accumulation a unit lands in the buffer once per micro-batch; after the first,
``GradFromHost`` has brought its sum so far back up (``carry``), so the landing adds to it.

The buffer is one explicit tensor, as large as the largest host unit's part, kept for the step
and reused unit after unit: a fresh tensor per unit would leave the caching allocator a block of
every unit's size. Before a unit lands in it, the compute stream waits for the copy down that
read the previous unit (its event, on CUDA); when the buffer is freed at the end of the step
phase, the copy stream's use of it (``record_stream``) keeps its memory until the copy ran.
"""

from __future__ import annotations

from typing import Any

import torch

from fzero.state.buffers import Workspace, alloc_storage, free_storage
from fzero.state.layout import FlatLayout


class GradientLandings:
    """Owns the gradient buffer, which unit holds it and the last copy that read it."""

    def __init__(self, layout: FlatLayout, workspace: Workspace):
        self.layout, self.workspace = layout, workspace
        self.buffer: torch.Tensor | None = None
        self.holder: int | None = None
        self.carried = False  # the holder's sum of earlier landings is in the buffer
        self._read: Any = None  # the event of the copy down that read the holder (CUDA)

    def target(self, unit: int) -> torch.Tensor:
        """Unit ``unit``'s part of the optimizer space, where its gradient lands."""
        u = self.layout.units[unit]
        if unit == self.holder:
            return self.buffer[: u.optimizer_numel]
        return self.workspace.grad_shard[
            u.optimizer_offset : u.optimizer_offset + u.optimizer_numel
        ]

    def take(self, unit: int, buffer_nbytes: int) -> None:
        """Unit ``unit``'s gradient lands in the buffer from now on (``AllocUnitGrad``)."""
        shard = self.workspace.grad_shard
        numel = buffer_nbytes // shard.element_size()
        if self.buffer is None or self.buffer.numel() != numel:
            self.buffer = torch.empty(numel, dtype=shard.dtype, device=shard.device)
        alloc_storage(self.buffer)
        if self._read is not None:  # the previous holder's copy down has read it
            torch.cuda.current_stream(shard.device).wait_event(self._read)
            self._read = None
        self.holder, self.carried = unit, False

    def carry(self, unit: int) -> None:
        """Unit ``unit``'s sum of this step's earlier landings is in the buffer now
        (``GradFromHost``): its landing adds to it instead of writing."""
        assert unit == self.holder, "GradFromHost follows its unit's AllocUnitGrad"
        self.carried = True

    def read_by(self, unit: int, event: Any) -> None:
        """A copy down of unit ``unit`` was issued (``event`` on its stream): the buffer is
        reused only after it, when the unit holds it."""
        if unit == self.holder:
            self._read = event

    def nbytes(self) -> int:
        """Bytes the buffer holds now (0 when freed)."""
        return 0 if self.buffer is None else self.buffer.untyped_storage().size()

    def free(self) -> None:
        """Give the buffer's memory back (``FreeGradBuffer``, or an aborted step)."""
        if self.buffer is not None:
            free_storage(self.buffer)
        self.holder, self._read = None, None
