"""The host optimizer: the handlers of optimizer offload's ops (the copies they issue are
``transfers.py``'s, the CPU AdamW arithmetic ``cpu_step.py``'s).

The fp32 master weights and AdamW moments of this rank's shard live in host memory (pinned
when ``offload_optimizer.pin_memory``), with a host gradient buffer beside them. Gradients come
down per unit (``CopyGradToHost``, on a copy stream of its own on CUDA), the CPU AdamW step runs
per unit (torch's fused CPU AdamW, ``torch._fused_adamw_``, the averaging, loss-scale and
clipping factor passed as its ``grad_scale`` so no pass over the gradient is added), and the
updated fp32 master goes back up (``CopyParamsToDevice``, on another copy stream, cast to the
compute dtype on the device) while the next unit steps. With parameter
offload the CPU step writes the host parameter shard itself, which the gathers upload.

``HostOptimizerStep`` copies a unit's gradient itself when no ``CopyGradToHost`` brought it this
step (the tracing micro-batch runs on-demand ops, which copy nothing; a unit no reduction wrote
has a zeroed slice): what it steps on is always the step's reduced gradient. With streamed
gradients (``fzero/schedule/streamed_grads.py``) every landing is copied down from the gradient
buffer, the tracing micro-batch's too, and a host unit no reduction wrote steps on zeros.

At stage 3 the CPU steps normally wait for the next step (``fzero/state/pending.py``):
``ScalarsToHost`` keeps the update pending (the gradient complete on the host, the lr and the
factor beside it), ``ApplyPendingUpdate`` applies a unit's part right before the unit's first
gather in the next forward and ``UploadUpdate`` brings it up; ``settle`` applies whatever is
left for readers between steps, and after a failed micro-batch.

Under partial offload (``offload_optimizer.ratio`` < 1) the schedule gives these ops to the host
units only; the host gradient buffer then covers their part of the optimizer space alone, which
starts at ``host_offset_numel``, and the master and moments are ``SplitFlat`` buffers whose host
part a host unit's optimizer range indexes.

Under NVMe offload (``files``, ``fzero/offload/files.py``) the master and moments live in swap
files: ``ReadStateFromFile`` stages a unit's ranges (one unit ahead), the CPU step runs on the
staged copy, ``WriteStateToFile`` writes it back, and the upload reads the staged master. With
parameter shards in a file, the step's compute-dtype values are written to it the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fzero.offload.cpu_step import CpuAdamW
from fzero.offload.transfers import HostTransfers
from fzero.runtime.landings import GradientLandings
from fzero.runtime.step_phase import OptimizerBuffers, StepPhase
from fzero.schedule import ops as O
from fzero.state.buffers import Workspace
from fzero.state.layout import FlatLayout


class HostOptimizer:
    """Owns the host gradient buffer and the step's decisions (skip, factor, what is pending);
    the copies are ``HostTransfers``' (``transfers.py``), the arithmetic ``CpuAdamW``'s
    (``cpu_step.py``)."""

    def __init__(
        self,
        layout: FlatLayout,
        workspace: Workspace,
        optimizer: OptimizerBuffers,
        step_phase: StepPhase,
        decay_ranges: tuple[tuple[int, int, float], ...],
        *,
        pin_memory: bool,
        compute_dtype: torch.dtype,
        params_on_host: bool,
        host_offset_numel: int = 0,
        files: Any = None,
        landings: GradientLandings | None = None,
    ):
        self.layout, self.workspace, self.optimizer = layout, workspace, optimizer
        # Where each unit's gradient landed on the device: the gradient shard, or the gradient
        # buffer of streamed gradients, which a copy down must have read before it is reused.
        self.landings = landings or GradientLandings(layout, workspace)
        self.files = files
        self.state_files = files.optimizer if files is not None else None
        self.shard_files = files.shards if files is not None else None
        self._written: dict[int, torch.Tensor] = {}  # unit -> stepped master, to write back
        self.step_phase = step_phase
        # Where gradients come down to; a pending update keeps its gradient there too.
        self.pending = optimizer.pending
        self.host_grad = optimizer.pending.grad
        # Partial offload: the host gradient buffer holds the host units' part of the optimizer
        # space only, which starts at this offset (the device part's elements).
        self.host_offset_numel = host_offset_numel
        # Where the CPU step writes each unit's compute-dtype values: the host parameter shard
        # when parameters are offloaded too (it is on the host), else the device shard (the fp32
        # master goes up and the device casts it).
        self.params_on_host = params_on_host
        self.cpu = CpuAdamW(layout, decay_ranges)
        self.transfers = HostTransfers(workspace, self.landings)
        self._skip = False
        self._inverse_scale = torch.ones((), dtype=torch.float32)
        # Units whose CPU step the schedule runs in the next first forward (ApplyPendingUpdate;
        # set by ``install``), and those of them applied since the update was decided.
        self.deferred: frozenset[int] = frozenset()
        self._applied: set[int] = set()

    def install(self, schedule: Any) -> None:
        """Read which units' CPU steps ``schedule`` runs in the next step's first forward."""
        self.deferred = frozenset(
            op.unit
            for entry in schedule.first_micro_extra
            for op in entry.ops
            if isinstance(op, O.ApplyPendingUpdate)
        )

    def _range(self, unit: int) -> slice:
        u = self.layout.units[unit]
        return slice(u.optimizer_offset, u.optimizer_offset + u.optimizer_numel)

    def _grad_range(self, unit: int) -> slice:
        """Unit ``unit``'s slice of the host gradient buffer."""
        span, offset = self._range(unit), self.host_offset_numel
        return slice(span.start - offset, span.stop - offset)

    # -- handlers -------------------------------------------------------------------------------

    def copy_grad_to_host(self, op: O.CopyGradToHost) -> None:
        self.transfers.gradient_down(op.unit, self.host_grad[self._grad_range(op.unit)])

    def grad_from_host(self, op: O.GradFromHost) -> None:
        self.transfers.gradient_up(op.unit, self.host_grad[self._grad_range(op.unit)])

    def scalars_to_host(self, op: O.ScalarsToHost) -> None:
        """The step's one host sync: skip or not, and the one factor AdamW reads (averaging
        over ranks, undoing the loss scale, clipping), as ``StepPhase.optimizer_step``."""
        phase = self.step_phase
        hyper, result = phase.hyper, phase.result
        assert hyper is not None
        found_inf = result.found_inf
        self._skip = found_inf is not None and bool(found_inf.item())
        scale = 1.0 / (phase.comm.world_size * hyper.loss_scale)
        # A skipped step uses no factor; clipping an infinite norm would make it zero.
        if hyper.max_grad_norm > 0 and not self._skip:
            norm = float(result.grad_norm)
            scale *= min(hyper.max_grad_norm / (norm + 1e-6), 1.0)
        # torch's fused kernel divides the gradient by its grad_scale: the inverse factor. An
        # infinite norm (an fp16 overflow, which skips the step) clips the factor to 0.
        inverse = 1.0 / scale if scale else math.inf
        self._inverse_scale = torch.tensor(inverse, dtype=torch.float32)
        if not self._skip:
            self.optimizer.step.add_(1)
        self.transfers.forget_uploads()
        self.transfers.end_landings()
        if self.deferred and not self._skip:
            self._keep_pending(hyper.lr)

    def _keep_pending(self, lr: float) -> None:
        """The deferred units' update waits in the state: their gradient complete on the host
        (copies landed, or made here where none ran), the step's lr and factor beside it."""
        for unit in sorted(self.deferred):
            self._gradient_landed(unit)
        self.pending.lr.fill_(lr)
        self.pending.inverse_scale.copy_(self._inverse_scale)
        self.pending.armed.fill_(1)
        self._applied = set()

    def _gradient_landed(self, unit: int) -> None:
        """Wait for unit ``unit``'s gradient copy of this step, or copy it now if none ran."""
        if self.transfers.wait_gradient(unit):
            return
        target, span = self.host_grad[self._grad_range(unit)], self._range(unit)
        if span.stop > self.workspace.grad_shard.numel():
            # Streamed gradients: the unit lands in no shard; with no copy this step, no
            # reduction wrote it (its backward did not run), so its gradient is zero.
            target.zero_()
        else:
            target.copy_(self.workspace.grad_shard[span])

    def host_optimizer_step(self, op: O.HostOptimizerStep) -> None:
        self._gradient_landed(op.unit)
        if self._skip:
            return
        hyper = self.step_phase.hyper
        assert hyper is not None
        self._adamw(op.unit, hyper.lr, self._inverse_scale)

    def apply_pending_update(self, op: O.ApplyPendingUpdate) -> None:
        """The previous step's update of unit ``op.unit``, if it is still pending."""
        if not self.pending.is_armed or op.unit in self._applied:
            return
        self._adamw(op.unit, float(self.pending.lr), self.pending.inverse_scale)
        self._applied.add(op.unit)
        if self._applied >= self.deferred:
            self.pending.armed.zero_()

    def upload_update(self, op: O.UploadUpdate) -> None:
        """Unit ``op.unit``'s updated master into its device shard, before the unit's gather.
        The compute stream waits for the copy, so a gather issued after it (on the gather
        stream or by the communicator) reads the updated values."""
        if self.state_files is not None and self.state_files.master(op.unit) is None:
            # NVMe: no update of the unit was staged in this forward (nothing was pending, or a
            # reader settled it and wrote the device shard): the shard holds the master already,
            # and reading the master through the file's mapping would fault it in page by page.
            return
        self.transfers.compute_waits(self._upload(op.unit))

    def restart_pending(self) -> None:
        """Another state's values were copied in: whatever it holds pending is all still to
        apply."""
        self._applied = set()

    def settle(self) -> None:
        """Apply what is still pending of the last decided update, now, and bring the device
        shards up to date: for readers of the weights between steps. The state's value does
        not change (the update was part of it)."""
        self.transfers.wait_parameters_down()
        if not self.pending.is_armed:
            self._wait_file_writes()
            return
        for unit in sorted(self.deferred - self._applied):
            master = self._adamw(unit, float(self.pending.lr), self.pending.inverse_scale)
            self._write_back(unit)
            target = self.workspace.param_out(unit)
            if not self.params_on_host and target is not None:
                target.copy_(master)
        self._applied = set(self.deferred)
        self.pending.armed.zero_()
        self._wait_file_writes()

    def _adamw(self, unit: int, lr: float, inverse_scale: torch.Tensor) -> torch.Tensor:
        """AdamW over unit ``unit``'s slice of the master and moments (their staged copy under
        NVMe offload), with the gradient in ``host_grad`` divided by ``inverse_scale``; with
        parameter offload it also writes the unit's host parameter shard (or keeps the values
        for ``WriteStateToFile``). Returns the updated master slice."""
        # beta1, beta2 and eps are the config's: any step's Hyper has them (a pending update
        # exists only after a step of this runtime ran).
        hyper, state = self.step_phase.hyper, self.optimizer
        assert hyper is not None
        span = self._range(unit)
        if self.state_files is not None:
            states = self.state_files.arrays(unit)
        else:
            states = tuple(t[span] for t in (state.master, state.exp_avg, state.exp_avg_sq))
        grad = self.host_grad[self._grad_range(unit)]
        self.cpu.step(unit, states, grad, state.step, hyper, lr, inverse_scale)
        master = states[0]
        if self.shard_files is not None and unit not in self.shard_files.resident:
            self._written[unit] = master  # the shard is in a file: WriteStateToFile
        elif self.params_on_host:  # the gathers upload the host shard: write it here
            self.workspace.param_out(unit).copy_(master)
        return master

    # -- NVMe offload: the swap files ------------------------------------------------------------

    def _steps_now(self, unit: int) -> bool:
        """Whether unit ``unit``'s CPU step is still to run in this phase."""
        if unit in self.deferred:
            return self.pending.is_armed and unit not in self._applied
        return not self._skip

    def read_state_from_file(self, op: O.ReadStateFromFile) -> None:
        if self.state_files is not None and self._steps_now(op.unit):
            self.state_files.read(op.unit)

    def write_state_to_file(self, op: O.WriteStateToFile) -> None:
        self._write_back(op.unit)

    def _write_back(self, unit: int) -> None:
        """Start writing what unit ``unit``'s step changed of its files."""
        if self.state_files is not None:
            self.state_files.write(unit)
        values = self._written.pop(unit, None)
        if values is not None:
            self.shard_files.write(unit, values)

    def read_shard_from_file(self, op: O.ReadShardFromFile) -> None:
        self.shard_files.read(op.unit)

    def wait_file_writes(self, op: O.WaitFileWrites) -> None:
        self._wait_file_writes()

    def _wait_file_writes(self) -> None:
        if self.files is not None:
            self.files.wait_writes()

    def copy_params_to_device(self, op: O.CopyParamsToDevice) -> None:
        if not self._skip:
            self.transfers.queue_upload(self._upload(op.unit))

    def _upload(self, unit: int) -> Any:
        """Unit ``unit``'s fp32 master up into its device shard; returns the copy's event (None
        on CPU, where it is done)."""
        source = self.state_files.master(unit) if self.state_files is not None else None
        from_staging = source is not None  # NVMe: the step's staged copy of the master
        if not from_staging:
            source = self.optimizer.master[self._range(unit)]
        event = self.transfers.upload(source, self.workspace.param_out(unit))
        if from_staging and event is not None:  # the staging buffer is reused once it ran
            self.state_files.uploading(unit, event)
        return event

    def wait_uploads(self, op: O.WaitUploads) -> None:
        self.transfers.wait_uploads()

    def copy_params_to_host(self, op: O.CopyParamsToHost) -> None:
        """Partial offload with parameter offload: the device units' stepped master, cast to the
        compute dtype, into their slices of the host shard; the next ``UploadShard`` of such a
        unit waits for the compute stream, so it reads the copied values; the step waits for the
        copies before it returns (``wait_copies_to_host``, from ``Executor.run_step``), and a
        failed step in ``settle``. A skipped step copies nothing (the master did not change)."""
        if self._skip:
            return
        master = self.optimizer.master
        pairs = [(master[self._range(u)], self.workspace.host_copy_out(u)) for u in op.units]
        self.transfers.parameters_down(pairs)

    def wait_copies_to_host(self) -> None:
        """The last ``CopyParamsToHost`` has landed: the host shard, a state leaf, holds the
        step's values for any reader (a checkpoint, a ``tree_map`` copy)."""
        self.transfers.wait_parameters_down()

    def abort(self) -> None:
        """A failed micro-batch: copies already issued finish, and a pending update that the
        forward had begun to apply is applied in full (the state given to the step holds it:
        its value must not be half of one)."""
        self.transfers.finish_gradients()
        if self.files is not None:  # what stepped goes back to the files; the rest is dropped
            for unit in list(self._written):
                self._write_back(unit)
            self.files.abort()
        self.settle()
