"""The copies between the device and host memory under optimizer offload, and their waits.

``HostTransfers`` owns the two copy streams (on CUDA: one down, one up) and the events of the
copies in flight: the gradients coming down (``CopyGradToHost``) and, with streamed gradients
under accumulation, their sums going back up for the next landing (``GradFromHost``), the
updated fp32 master
going up into the device shard (``CopyParamsToDevice``, ``UploadUpdate``; the device casts it,
so the host does no cast pass and keeps no staging buffer), and, under partial offload with
parameter offload, the device units' parameters coming down into the host shard
(``CopyParamsToHost``). On the CPU every copy is done when it returns. ``HostOptimizer``
(``optimizer.py``) decides which copy runs when; this class only moves bytes and waits.
"""

from __future__ import annotations

from typing import Any

import torch

from fzero.runtime.landings import GradientLandings
from fzero.state.buffers import Workspace

MISSING = object()  # no gradient copy of a unit ran this step


class HostTransfers:
    def __init__(self, workspace: Workspace, landings: GradientLandings):
        self.workspace, self.landings = workspace, landings
        self.device = workspace.grad_shard.device
        self.on_cuda = self.device.type == "cuda"
        self._down: Any = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._up: Any = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._grad_copies: dict[int, Any] = {}  # unit -> event (None on CPU: copied already)
        self._sent: set[int] = set()  # units whose gradient came down since the step began
        self._uploads: list[Any] = []
        self._copies_to_host: Any = None  # the last copy into the host shard (CUDA)

    # -- gradients down -------------------------------------------------------------------------

    def gradient_down(self, unit: int, target: torch.Tensor) -> None:
        """Unit ``unit``'s landed gradient into ``target`` (its host buffer slice), on the down
        stream once the reduction landed."""
        source = self.landings.target(unit)
        self._sent.add(unit)
        if not self.on_cuda:
            target.copy_(source)
            self._grad_copies[unit] = None
            return
        stream = self._down
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the reduction landed
        with torch.cuda.stream(stream):
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        # The shard (or the gradient buffer) is freed on the compute stream after the host
        # steps, which wait for this; the buffer is reused only after it (landings.py).
        source.record_stream(stream)
        self.landings.read_by(unit, event)
        self._grad_copies[unit] = event

    def gradient_up(self, unit: int, source: torch.Tensor) -> None:
        """Unit ``unit``'s gradient copied down earlier in this step (``source``, its host
        buffer slice: the sum of its landings so far) back into the gradient buffer it holds,
        so that its next landing adds to it (``GradFromHost``). The copy waits for the copy down
        to have landed and the device for the copy; nothing to do in a step's first landing."""
        if unit not in self._sent:
            return
        target = self.landings.target(unit)
        if not self.on_cuda:
            target.copy_(source)
        else:
            stream, compute = self._up, torch.cuda.current_stream(self.device)
            stream.wait_stream(compute)  # the buffer is this unit's (AllocUnitGrad waited)
            down = self._grad_copies.get(unit)
            if down is not None:
                stream.wait_event(down)
            with torch.cuda.stream(stream):
                target.copy_(source, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            target.record_stream(stream)
            compute.wait_event(done)
        self.landings.carry(unit)

    def end_landings(self) -> None:
        """No gradient lands again in this step (its scalars are on the host): the next
        landing of every unit is a new step's first."""
        self._sent.clear()

    def wait_gradient(self, unit: int) -> bool:
        """Wait for unit ``unit``'s gradient copy of this step; False when none ran."""
        copied = self._grad_copies.pop(unit, MISSING)
        if copied is MISSING:
            return False
        if copied is not None:
            copied.synchronize()
        return True

    def finish_gradients(self) -> None:
        """Let every gradient copy issued finish (a failed micro-batch)."""
        for event in self._grad_copies.values():
            if event is not None:
                event.synchronize()
        self._grad_copies.clear()
        self._sent.clear()

    # -- the master up --------------------------------------------------------------------------

    def upload(self, source: torch.Tensor, target: torch.Tensor) -> Any:
        """The fp32 ``source`` (a unit's updated master) up into ``target`` (its device shard,
        compute dtype), on the up stream; returns the copy's event (None on CPU, where it is
        done). The fp32 master goes up and the device casts it: no cast pass on the host, whose
        memory bandwidth the CPU steps need."""
        if not self.on_cuda:
            target.copy_(source)
            return None
        with torch.cuda.stream(self._up):
            staged = source.to(self.device, non_blocking=True)
            target.copy_(staged)
            event = torch.cuda.Event()
            event.record(self._up)
        return event

    def compute_waits(self, event: Any) -> None:
        """The compute stream waits for ``event`` (an upload), so work issued after it (a
        gather, on the gather stream or by the communicator) reads the uploaded values."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def queue_upload(self, event: Any) -> None:
        if event is not None:
            self._uploads.append(event)

    def wait_uploads(self) -> None:
        """The compute stream waits for every queued upload (``WaitUploads``)."""
        for event in self._uploads:
            self.compute_waits(event)
        self._uploads = []

    def forget_uploads(self) -> None:
        self._uploads = []

    # -- parameters down into the host shard ----------------------------------------------------

    def parameters_down(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each ``(source, target)``: a device master slice cast into its host shard slice. On
        CUDA the copies queue on the compute stream behind the step that wrote the master, into
        pinned memory without blocking the host; the cast runs on the device, so half the bytes
        cross the bus and the host does no pass."""
        for source, target in pairs:
            if self.on_cuda:
                target.copy_(source.to(target.dtype), non_blocking=True)
            else:
                target.copy_(source)
        if self.on_cuda and pairs:
            self._copies_to_host = torch.cuda.Event()
            self._copies_to_host.record(torch.cuda.current_stream(self.device))

    def wait_parameters_down(self) -> None:
        """Before the host reads the parameter shard: the last ``parameters_down`` landed."""
        if self._copies_to_host is not None:
            self._copies_to_host.synchronize()
            self._copies_to_host = None
