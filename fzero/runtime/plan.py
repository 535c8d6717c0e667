"""Planning: the units' sizes, the config and the world size -> the step's schedule.

Pure: nothing here touches a device, a process group or a model. ``Plan`` is what the runtime
runs: the layout, the units as the compiler sees them, the knobs read from the config, and the
schedule compiled for a trigger order (presumed from module order until the first micro-batch
is traced, then the traced one). Re-tracing makes a new plan; the executor installs its
schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fzero.config import Config
from fzero.schedule import Knobs, Schedule, Trigger, UnitInfo, compile_schedule, presumed_trace
from fzero.schedule.streamed_grads import lands_once, streams
from fzero.state.layout import FlatLayout, dtype_from_name

if TYPE_CHECKING:
    from fzero.offload.plan import OffloadPlan


@dataclass(frozen=True)
class Plan:
    layout: FlatLayout
    units: tuple[UnitInfo, ...]
    knobs: Knobs
    world_size: int
    stage: int
    trace: tuple[Trigger, ...]
    schedule: Schedule

    def retraced(self, trace: tuple[Trigger, ...]) -> Plan:
        """The plan for the order a micro-batch really ran in."""
        schedule = _compile(self.layout, self.units, self.knobs, self.stage, self.world_size, trace)
        return replace(self, trace=trace, schedule=schedule)


def make_plan(
    layout: FlatLayout,
    units: tuple[UnitInfo, ...],
    config: Config,
    world_size: int,
    offload: OffloadPlan,
) -> Plan:
    """The plan before any step ran: the on-demand schedule over the presumed order.
    ``offload``: where the state lives (decided once from the config, ``OffloadPlan``)."""
    knobs, trace = knobs_from(config, layout, offload), presumed_trace(units)
    schedule = _compile(layout, units, knobs, config.stage, world_size, trace, traced=False)
    return Plan(layout, units, knobs, world_size, config.stage, trace, schedule)


def _compile(
    layout: FlatLayout,
    units: tuple[UnitInfo, ...],
    knobs: Knobs,
    stage: int,
    world_size: int,
    trace: tuple[Trigger, ...],
    traced: bool = True,
) -> Schedule:
    return compile_schedule(
        units,
        stage=stage,
        world_size=world_size,
        trace=trace,
        traced=traced,
        optimizer_numel=layout.optimizer_numel,
        grad_shard_nbytes=layout.optimizer_numel * knobs.grad_shard_itemsize,
        knobs=knobs,
    )


def knobs_from(config: Config, layout: FlatLayout, offload: OffloadPlan) -> Knobs:
    """The compiler's knobs, read from the config (DeepSpeed's names, in elements) and, for
    offload, from ``offload``."""
    zero = config.zero_optimization
    reduction = ""  # the stage's default
    if config.fzero.deterministic:
        reduction = "ordered"
    elif config.stage >= 2 and not config.reduce_every_micro_batch:
        reduction = "last_micro_batch"
    compute_itemsize = dtype_from_name(config.compute_dtype_name).itemsize
    grad_itemsize = dtype_from_name(config.grad_accum_dtype_name).itemsize
    gather_numel = sum(u.padded_numel for u in layout.units if u.has_trainable)
    host_units = None  # every unit's step on the host
    if offload.optimizer_on_host:
        split = offload.split(layout)
        host_units = split.host_units if split.is_partial else None
    return Knobs(
        prefetch=zero.overlap_comm,
        max_live_nbytes=zero.stage3_max_live_parameters * compute_itemsize,
        max_reuse_numel=zero.stage3_max_reuse_distance,
        prefetch_bucket_numel=zero.stage3_prefetch_bucket_size,
        overlap_reductions=zero.overlap_comm,
        reduce_bucket_numel=zero.reduce_bucket_size,
        gather_bucket_numel=zero.allgather_bucket_size,
        gradient_reduction=reduction,
        grad_gather_nbytes=gather_numel * grad_itemsize,
        grad_shard_itemsize=grad_itemsize,
        offload_optimizer=offload.optimizer_on_host,
        host_step_units=host_units,
        offload_param=offload.params_on_host,
        stream_gradients=streams_gradients(config, offload),
        accumulate_streamed_grads=not lands_once(
            config.stage, config.gradient_accumulation_steps, config.reduce_every_micro_batch
        ),
        offload_update_in_forward=config.fzero.offload_update_in_forward,
        optimizer_in_files=offload.optimizer_in_files,
        params_in_files=offload.params_in_files,
        resident_shard_units=offload.resident_shard_units(layout),
    )


def streams_gradients(config: Config, offload: OffloadPlan) -> bool:
    """Whether host units' gradients stream down as they land (``streamed_grads.streams``)
    instead of filling a whole gradient shard, as ``fzero.stream_gradients`` asks."""
    return streams(
        optimizer_offloaded=offload.optimizer_on_host,
        deterministic=config.fzero.deterministic,
        stage=config.stage,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        requested=config.fzero.stream_gradients,
        reduce_every_micro_batch=config.reduce_every_micro_batch,
    )
