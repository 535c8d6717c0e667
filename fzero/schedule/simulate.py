"""simulate: replay a schedule against a cost model and get a timeline, for any world size.

Three streams, as on a GPU: ``compute`` runs forward, backward, the optimizer and every wait;
``gather`` and ``reduce`` run collectives in issue order. A collective starts when the compute
stream issues it and its stream is free; a ``Wait*`` op blocks compute until that collective
ends, and the time compute spends blocked is the exposed communication. Collective times follow
the ring algorithms: all-gather and reduce-scatter cost ``(N-1)`` latencies plus ``(N-1)/N`` of
the full buffer over the link, all-reduce twice that.

Memory is tracked in bytes as the ops allocate and free (gathered parameters, gradient buffers,
the gradient shard from the ``ZeroGradShard`` that finds it freed to its ``FreeGradShard``, and
with streamed gradients the gradient buffer from the step's first ``AllocUnitGrad`` to its
``FreeGradBuffer``) on top of what a ``MemoryModel`` says lives for the whole step.

Compute is placed at the triggers: a unit's forward (backward) right after the ops of its
``pre_forward`` (``pre_backward``). The root unit wraps the blocks, so half of its compute runs
there and half just before its ``post_*`` trigger (embedding first, head last).

This file is the replay (the event loop over the ops); what it returns is
``simulated_timeline.py``, what each piece of work costs ``cost_model.py``.
"""

from __future__ import annotations

from fzero.errors import ScheduleError
from fzero.schedule import ops as O
from fzero.schedule.cost_model import CostModel
from fzero.schedule.memory_model import BytesPerParam, MemoryModel
from fzero.schedule.schedule import Schedule
from fzero.schedule.simulated_timeline import MemorySample, Span, Timeline

__all__ = ["simulate"]

DEFAULT_COST = CostModel()  # frozen: one instance serves every call


def simulate(
    schedule: Schedule,
    cost: CostModel = DEFAULT_COST,
    micro_batches: int = 1,
    memory: MemoryModel | None = None,
    bytes_per_param: BytesPerParam | None = None,
) -> Timeline:
    """Replay ``schedule`` for one optimizer step of ``micro_batches`` micro-batches.

    ``memory`` defaults to ``MemoryModel.from_schedule(schedule, bytes_per_param)``: fzero's
    buffers, at the ZeRO paper's bytes per parameter (2, 2 and K = 12) when that is None too.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    streaming = schedule.grad_streaming
    if streaming is not None and streaming.one_micro_batch and micro_batches != 1:
        raise ValueError(
            f"micro_batches is {micro_batches}, but this schedule streams gradients for one "
            "micro-batch per step (gradient_accumulation_steps 1): simulate one, or compile "
            "for accumulation (fzero.stream_gradients true with gradient_accumulation_steps)"
        )
    if memory is None:
        memory = MemoryModel.from_schedule(schedule, bytes_per_param or BytesPerParam())
    replay = _Replay(schedule, cost, memory)
    for micro in range(micro_batches):
        # A step after another: the first micro-batch applies the previous step's updates.
        entries = schedule.micro_entries(micro == micro_batches - 1, first=micro == 0)
        before, after = _compute_placement(schedule, entries, cost)
        for index, entry in enumerate(entries):
            for name, seconds in before.get(index, ()):
                replay.compute(name, seconds, micro)
            replay.run(entry.ops, micro)
            for name, seconds in after.get(index, ()):
                replay.compute(name, seconds, micro)
    for entry in schedule.step:
        replay.run(entry.ops, -1)
    return replay.timeline(micro_batches)


def _compute_placement(
    schedule: Schedule, entries: tuple[O.Entry, ...], cost: CostModel
) -> tuple[dict[int, list[tuple[str, float]]], dict[int, list[tuple[str, float]]]]:
    """Compute to run before / after the ops of each micro-step entry, by entry index."""
    by_index = {u.index: u for u in schedule.units}
    before: dict[int, list[tuple[str, float]]] = {}
    after: dict[int, list[tuple[str, float]]] = {}
    for i, entry in enumerate(entries):
        kind, unit = entry.trigger.kind, by_index.get(entry.trigger.unit)
        if kind == O.PRE_RECOMPUTE and unit is not None:
            # Activation checkpointing runs the unit's forward again, inside backward.
            name = f"recompute unit {unit.index} ({unit.name or '<root>'})"
            after.setdefault(i, []).append((name, cost.forward(unit)))
            continue
        if kind not in (O.PRE_FORWARD, O.PRE_BACKWARD) or unit is None:
            continue
        forward = kind == O.PRE_FORWARD
        seconds = cost.forward(unit) if forward else cost.backward(unit)
        name = f"{'forward' if forward else 'backward'} unit {unit.index} ({unit.name or '<root>'})"
        post = O.Trigger(O.POST_FORWARD if forward else O.POST_BACKWARD, unit.index)
        end = next(
            (j for j in range(i + 1, len(entries)) if entries[j].trigger in (post, entry.trigger)),
            None,
        )
        if unit.is_root and end is not None and entries[end].trigger == post and end > i + 1:
            after.setdefault(i, []).append((name, seconds / 2))
            before.setdefault(end, []).append((name, seconds / 2))
        else:
            after.setdefault(i, []).append((name, seconds))
    return before, after


SHARD_READ = "file-shard"  # in-flight key of a parameter shard's read (the state's: O.FILE)
PARAMS_DOWN = "params-down"  # in-flight key of a device unit's CopyParamsToHost


class _Replay:
    """The clocks and buffers of one rank while the schedule runs."""

    def __init__(self, schedule: Schedule, cost: CostModel, memory: MemoryModel):
        self.schedule, self.cost, self.memory = schedule, cost, memory
        self.world_size = schedule.world_size
        self.units = {u.index: u for u in schedule.units}
        self.now = 0.0  # the compute stream's clock
        # The clock of the host thread that issues the device's work: the CPU optimizer steps
        # and the step's one host sync hold it; the device runs on what was issued meanwhile.
        self.host_now = 0.0
        self.stream_free = {
            O.GATHER: 0.0,
            O.REDUCE: 0.0,
            O.DEVICE_TO_HOST: 0.0,
            O.HOST_TO_DEVICE: 0.0,
            O.FILE: 0.0,
        }
        self.in_flight: dict[tuple[str, int], float] = {}  # (stream, unit) -> collective end
        self.sent_down: set[int] = set()  # units whose gradient went down in this step
        self.spans: list[Span] = []
        self.compute_seconds = self.exposed_seconds = 0.0
        stage = schedule.stage
        # Below stage 3 every unit stays gathered; in stage 3 the persistent ones do.
        kept = {u.index for u in schedule.units if u.persistent}
        self.gathered = set(self.units) if stage < 3 else kept
        self.grads = {
            u.index: u.grad_nbytes for u in schedule.units if u.has_trainable and stage < 2
        }
        # The gradient shard the schedule allocates (stages 1-3): None while it is freed.
        self.grad_shard_nbytes: int | None = None
        self.grad_buffer_nbytes = 0  # streamed gradients' buffer, while allocated
        self.samples = [self.sample()]

    def sample(self) -> MemorySample:
        grad_shard_nbytes = self.memory.gradient_shard_nbytes + (self.grad_shard_nbytes or 0)
        grad_shard_nbytes += self.grad_buffer_nbytes
        return MemorySample(
            time=self.now,
            parameters=sum(self.units[i].param_nbytes for i in self.gathered),
            gradients=sum(self.grads.values()) + grad_shard_nbytes,
            optimizer_state=self.memory.optimizer_state_nbytes,
            persistent_shards=self.memory.parameter_shard_nbytes,
        )

    def compute(self, name: str, seconds: float, micro: int) -> None:
        start = max(self.now, self.host_now)  # issued once the host thread gets there
        self.spans.append(Span(name, O.COMPUTE, "compute", start, start + seconds, micro))
        self.now = start + seconds
        self.compute_seconds += seconds

    def collective(self, op: O.Op, stream: str, seconds: float, micro: int) -> float:
        # After the compute it follows on the device, and once the host thread issued it.
        start = max(self.now, self.host_now, self.stream_free[stream])
        end = start + seconds
        self.stream_free[stream] = end
        self.spans.append(Span(_op_text(op), stream, "collective", start, end, micro))
        return end

    def wait(self, op: O.Op, end: float, micro: int) -> None:
        if end > self.now:
            self.spans.append(Span(_op_text(op), O.COMPUTE, "wait", self.now, end, micro))
            self.exposed_seconds += end - self.now
            self.now = end
        else:
            self.spans.append(Span(_op_text(op), O.COMPUTE, "op", self.now, self.now, micro))

    def run(self, ops: tuple[O.Op, ...], micro: int) -> None:
        n = self.world_size
        for op in ops:
            if isinstance(op, O.AllGather):
                end = self.collective(op, O.GATHER, self.cost.all_gather(op.nbytes, n), micro)
                self.in_flight[(O.GATHER, op.unit)] = end
                self.gathered.add(op.unit)
            elif isinstance(op, (O.ReduceScatter, O.AllReduce, O.ReduceInOrder)):
                if isinstance(op, O.AllReduce):
                    seconds = self.cost.all_reduce(op.nbytes, n)
                elif isinstance(op, O.ReduceInOrder) and op.whole_unit:
                    # Every rank receives every other rank's whole gradient.
                    seconds = self.cost.all_gather(op.nbytes * n, n)
                else:  # an all-to-all of shard slices moves what a reduce-scatter moves
                    seconds = self.cost.reduce_scatter(op.nbytes, n)
                self.in_flight[(O.REDUCE, op.unit)] = self.collective(op, O.REDUCE, seconds, micro)
            elif isinstance(op, O.UploadShard):  # before its gather, on the gather stream
                self.wait(op, self.in_flight.pop((SHARD_READ, op.unit), self.now), micro)
                # A device unit's stepped values must have come down (CopyParamsToHost).
                landed = self.in_flight.pop((PARAMS_DOWN, op.unit), 0.0)
                self.stream_free[O.GATHER] = max(self.stream_free[O.GATHER], landed)
                self.collective(op, O.GATHER, self.cost.upload(op.nbytes), micro)
            elif isinstance(op, (O.ReadStateFromFile, O.ReadShardFromFile)):
                seconds = self.cost.file_read(op.nbytes)
                key = O.FILE if isinstance(op, O.ReadStateFromFile) else SHARD_READ
                self.in_flight[(key, op.unit)] = self.collective(op, O.FILE, seconds, micro)
            elif isinstance(op, O.WriteStateToFile):
                self.collective(op, O.FILE, self.cost.file_write(op.nbytes), micro)
            elif isinstance(op, O.WaitFileWrites):  # the file stream runs reads and writes
                self.wait(op, self.stream_free[O.FILE], micro)
            elif isinstance(op, O.CopyGradToHost):
                seconds = self.cost.download(op.nbytes)
                end = self.collective(op, O.DEVICE_TO_HOST, seconds, micro)
                self.in_flight[(O.DEVICE_TO_HOST, op.unit)] = end
                self.sent_down.add(op.unit)
            elif isinstance(op, O.GradFromHost) and op.unit in self.sent_down:
                # The sum so far comes up once its copy down landed; the landing waits for it.
                down = self.in_flight.get((O.DEVICE_TO_HOST, op.unit), 0.0)
                up = O.HOST_TO_DEVICE
                self.stream_free[up] = max(self.stream_free[up], down)
                end = self.collective(op, up, self.cost.upload(op.nbytes), micro)
                self.wait(op, end, micro)
            elif isinstance(op, O.CopyParamsToHost):
                seconds = self.cost.download(op.nbytes)
                end = self.collective(op, O.DEVICE_TO_HOST, seconds, micro)
                for unit in op.units:
                    self.in_flight[(PARAMS_DOWN, unit)] = end
            elif isinstance(op, (O.HostOptimizerStep, O.ApplyPendingUpdate)):
                self.host_step(op, micro)
            elif isinstance(op, O.UploadUpdate):  # the compute stream waits for it
                end = self.collective(op, O.HOST_TO_DEVICE, self.cost.upload(op.nbytes), micro)
                self.wait(op, end, micro)
            elif isinstance(op, O.CopyParamsToDevice):
                seconds = self.cost.upload(op.nbytes)
                end = self.collective(op, O.HOST_TO_DEVICE, seconds, micro)
                self.in_flight[(O.HOST_TO_DEVICE, op.unit)] = end
            elif isinstance(op, O.WaitUploads):
                ends = [t for (s, _), t in self.in_flight.items() if s == O.HOST_TO_DEVICE]
                self.in_flight = {
                    k: t for k, t in self.in_flight.items() if k[0] != O.HOST_TO_DEVICE
                }
                self.wait(op, max(ends, default=self.now), micro)
            elif isinstance(op, O.ScalarsToHost):  # the host waits for the device: one sync
                self.host_now = max(self.host_now, self.now)
                self.spans.append(Span(_op_text(op), O.COMPUTE, "op", self.now, self.now, micro))
            elif isinstance(op, O.WriteGradShard):  # one rank: a local write, no collective
                self.in_flight[(O.REDUCE, op.unit)] = self.now
                self.spans.append(Span(_op_text(op), O.COMPUTE, "op", self.now, self.now, micro))
            elif isinstance(op, (O.WaitGather, O.WaitReduce)):
                stream = O.GATHER if isinstance(op, O.WaitGather) else O.REDUCE
                self.wait(op, self.in_flight.pop((stream, op.unit), self.now), micro)
                if isinstance(op, O.WaitReduce) and op.frees_nbytes:
                    self.grads.pop(op.unit, None)
            elif isinstance(op, O.ReduceScalars):  # a blocking 8-byte all-reduce
                end = self.collective(op, O.REDUCE, self.cost.all_reduce(8, n), micro)
                self.wait(op, end, micro)
            elif isinstance(op, O.ReduceScalarsInOrder):  # blocking gathers: gradient, losses
                seconds = self.cost.all_gather(op.grad_nbytes, n) + self.cost.all_gather(4 * n, n)
                self.wait(op, self.collective(op, O.REDUCE, seconds, micro), micro)
            elif isinstance(op, O.OptimizerStep):
                self.compute(_op_text(op), self.cost.optimizer(op.shard_numel), micro)
            elif isinstance(
                op,
                (
                    O.Release,
                    O.ZeroGrad,
                    O.DropGrads,
                    O.AllocGrad,
                    O.AllocGradShard,
                    O.ZeroGradShard,
                    O.FreeGradShard,
                    O.AllocUnitGrad,
                    O.GradFromHost,  # the step's first landing of its unit: nothing to bring
                    O.FreeGradBuffer,
                    O.AccumulateGradNorm,  # a read of one unit's part, like ReduceScalars' norm
                ),
            ):
                self.bookkeeping(op)
                self.spans.append(Span(_op_text(op), O.COMPUTE, "op", self.now, self.now, micro))
            else:
                raise ScheduleError(f"simulate does not know the op {type(op).__name__}")
            self.samples.append(self.sample())

    def host_step(self, op: O.HostOptimizerStep | O.ApplyPendingUpdate, micro: int) -> None:
        """The host runs the CPU step once the unit's gradient is down and its state is read from
        its file under NVMe offload (it waits for both); the thread that issues the device's work
        is busy meanwhile, so nothing new reaches the device until it is done, while what was
        issued before runs on."""
        ready = self.in_flight.pop((O.DEVICE_TO_HOST, op.unit), 0.0)
        ready = max(ready, self.in_flight.pop((O.FILE, op.unit), 0.0))  # its state's read
        start = max(self.host_now, ready)
        seconds = self.cost.cpu_optimizer(op.numel)
        if op.shard_nbytes:  # parameter offload: the host shard the gathers upload
            seconds += self.cost.host_cast(op.numel, op.shard_nbytes)
        self.spans.append(Span(_op_text(op), O.HOST, "compute", start, start + seconds, micro))
        self.host_now = start + seconds
        self.compute_seconds += seconds

    def bookkeeping(self, op: O.Op) -> None:
        if isinstance(op, O.Release):
            self.gathered.discard(op.unit)
        elif isinstance(op, (O.ZeroGrad, O.DropGrads, O.AllocGrad)):  # live: nothing new
            self.grads[op.unit] = op.nbytes
        elif isinstance(op, (O.AllocGradShard, O.ZeroGradShard)) and self.grad_shard_nbytes is None:
            self.grad_shard_nbytes = op.nbytes  # on a live shard it does nothing
        elif isinstance(op, O.FreeGradShard):
            self.grad_shard_nbytes = None
        elif isinstance(op, O.AllocUnitGrad):  # the buffer, allocated once, then reused
            self.grad_buffer_nbytes = op.buffer_nbytes
        elif isinstance(op, O.FreeGradBuffer):
            self.grad_buffer_nbytes = 0

    def timeline(self, micro_batches: int) -> Timeline:
        end = max([self.now, self.host_now, *self.in_flight.values(), *self.stream_free.values()])
        return Timeline(
            stage=self.schedule.stage,
            world_size=self.world_size,
            micro_batches=micro_batches,
            spans=tuple(self.spans),
            memory=tuple(self.samples),
            step_seconds=end,
            compute_seconds=self.compute_seconds,
            exposed_communication_seconds=self.exposed_seconds,
        )


def _op_text(op: O.Op) -> str:
    return " ".join(str(op).split())
