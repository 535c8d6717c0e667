"""The offload passes, in the order ``compile_schedule`` applies them after the collective
passes: streamed gradients or the copies down (``streamed_grads.py``, ``offload.py``), the CPU
steps and uploads of the step phase, stage 3's CPU steps moved into the next first forward,
parameter offload's uploads before gathers, and NVMe's file reads and writes (``file_pass.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from fzero.schedule.file_pass import file_io_steps, read_shards_ahead, wait_file_writes
from fzero.schedule.offload import (
    copy_grads_down,
    defer_host_steps,
    host_step_ops,
    upload_before_gathers,
)
from fzero.schedule.ops import STEP, Entry, Op, Trigger
from fzero.schedule.schedule import UnitInfo
from fzero.schedule.streamed_grads import GradStreaming, stream_gradients

if TYPE_CHECKING:
    from fzero.schedule.compile import Knobs


def apply_offload(
    units: tuple[UnitInfo, ...],
    stage: int,
    reduction: str,
    traced: bool,
    micro: tuple[Entry, ...],
    last_micro: tuple[Entry, ...] | None,
    ops: tuple[Op, ...],
    knobs: Knobs,
) -> tuple[
    tuple[Entry, ...],
    tuple[Entry, ...] | None,
    tuple[Entry, ...],
    tuple[Op, ...],
    GradStreaming | None,
]:
    """The micro-step, last micro-step, first-micro-batch extra and step-phase ops with the
    offload ops the knobs ask for, and the gradient streaming chosen (None: the whole shard)."""
    streaming = None
    if knobs.offload_optimizer:
        itemsize = knobs.grad_shard_itemsize
        host = knobs.host_step_units
        if knobs.stream_gradients and reduction != "ordered":
            in_micro_steps = reduction != "step"
            accumulates = in_micro_steps and knobs.accumulate_streamed_grads
            streaming = GradStreaming.of(
                units, host, itemsize, accumulates, in_micro_steps and not accumulates
            )
            micro = _streamed(units, micro, streaming)
            last_micro = _streamed(units, last_micro, streaming) if last_micro else None
        elif reduction != "step" and traced:  # reduced in the micro-step: copy after the last
            last_micro = copy_grads_down(units, last_micro or micro, itemsize, host)
        ops = host_step_ops(
            units,
            ops,
            reduces_in_step=reduction == "step" and streaming is None,
            grad_itemsize=itemsize,
            param_offload=knobs.offload_param,
            host_units=host,
        )
        if streaming is not None:
            ops = stream_gradients(units, ops, streaming)
    first_extra: tuple[Entry, ...] = ()
    if knobs.offload_optimizer and stage == 3 and knobs.offload_update_in_forward:
        first_extra, ops = defer_host_steps(units, micro, ops, param_offload=knobs.offload_param)
    if knobs.offload_param:
        micro = upload_before_gathers(units, micro)
        last_micro = upload_before_gathers(units, last_micro) if last_micro else None
        (ops_entry,) = upload_before_gathers(units, (Entry(Trigger(STEP), ops),))
        ops = ops_entry.ops
    if knobs.optimizer_in_files or knobs.params_in_files:
        micro, last_micro, first_extra, ops = _with_file_io(
            units, micro, last_micro, first_extra, ops, knobs
        )
    return micro, last_micro, first_extra, ops, streaming


def _streamed(
    units: tuple[UnitInfo, ...], entries: tuple[Entry, ...], streaming: GradStreaming
) -> tuple[Entry, ...]:
    return tuple(
        replace(entry, ops=stream_gradients(units, entry.ops, streaming)) for entry in entries
    )


def _with_file_io(units, micro, last_micro, first_extra, ops, knobs):
    """NVMe offload: the swap files' reads and writes around the CPU steps and the uploads."""
    resident = knobs.resident_shard_units
    in_files = {
        "optimizer_in_files": knobs.optimizer_in_files,
        "params_in_files": knobs.params_in_files,
        "resident": resident,
    }
    first_extra = file_io_steps(units, first_extra, **in_files)
    (step,) = file_io_steps(units, (Entry(Trigger(STEP), ops),), **in_files)
    ops = wait_file_writes(step.ops)
    if knobs.params_in_files:
        micro = read_shards_ahead(units, micro, resident)
        last_micro = read_shards_ahead(units, last_micro, resident) if last_micro else None
        (step,) = read_shards_ahead(units, (Entry(Trigger(STEP), ops),), resident)
        ops = step.ops
    return micro, last_micro, first_extra, ops
