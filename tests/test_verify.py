"""verify: the compiler's schedules keep every invariant; broken schedules are caught by name."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fzero.errors import ScheduleError, ScheduleInvariantError
from fzero.schedule import collective_signature, verify
from fzero.schedule import ops as O
from fzero.schedule.compile import Knobs, compile_schedule, presumed_trace
from fzero.schedule.schedule import Schedule, UnitInfo
from fzero.schedule.serialize import schedule_from_json, schedule_to_json

# -- strategies: unit lists and the traces hooks would raise for them --------------------------


@st.composite
def unit_lists(draw, world_size: int, compute_itemsize: int | None = None) -> tuple[UnitInfo, ...]:
    """A root unit (maybe) and 0-6 blocks of odd sizes, padded to ``world_size``; some frozen."""
    blocks = draw(st.integers(0, 6))
    root = blocks == 0 or draw(st.booleans())
    names = ([""] if root else []) + [f"blocks.{i}" for i in range(blocks)]
    compute_itemsize = compute_itemsize or draw(st.sampled_from([2, 4]))
    reduce_itemsize = draw(st.sampled_from([2, 4]))
    frozen = draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    if all(frozen):
        frozen[0] = False
    units = []
    for index, (name, is_frozen) in enumerate(zip(names, frozen)):
        numel = draw(st.integers(1, 5000))
        padded = -(-numel // world_size) * world_size
        trainable = not is_frozen
        units.append(
            UnitInfo(
                index,
                name,
                numel,
                padded * compute_itemsize,
                padded * compute_itemsize if trainable else 0,
                padded * reduce_itemsize if trainable else 0,
                trainable,
            )
        )
    return tuple(units)


@st.composite
def traces(draw, units: tuple[UnitInfo, ...]) -> tuple[O.Trigger, ...]:
    """The order the hooks raise triggers in: blocks in any order, one maybe run twice; backward
    in reverse; ``post_backward`` after a unit's last gradient, or at the end for frozen units."""
    if draw(st.booleans()):
        return presumed_trace(units)
    root = [u.index for u in units if u.is_root]
    frozen = {u.index for u in units if not u.has_trainable}
    order = list(draw(st.permutations([u.index for u in units if not u.is_root])))
    if order and draw(st.booleans()):
        order.insert(draw(st.integers(0, len(order))), draw(st.sampled_from(order)))
    trace = [O.Trigger(O.PRE_FORWARD, r) for r in root]
    for b in order:
        trace += [O.Trigger(O.PRE_FORWARD, b), O.Trigger(O.POST_FORWARD, b)]
    trace += [O.Trigger(O.POST_FORWARD, r) for r in root]
    trace += [O.Trigger(O.PRE_BACKWARD, r) for r in root]
    remaining = {b: order.count(b) for b in order}
    for b in reversed(order):
        trace.append(O.Trigger(O.PRE_BACKWARD, b))
        remaining[b] -= 1
        if remaining[b] == 0 and b not in frozen:
            trace.append(O.Trigger(O.POST_BACKWARD, b))
    trace += [O.Trigger(O.POST_BACKWARD, r) for r in root if r not in frozen]
    started = set(order) | set(root)
    trace += [O.Trigger(O.POST_BACKWARD, u) for u in sorted(started & frozen, reverse=True)]
    trace.append(O.Trigger(O.BACKWARD_END))
    return tuple(trace)


@st.composite
def schedules(draw, stages=(0, 1, 2, 3)) -> tuple[Schedule, Knobs]:
    world_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    units = draw(unit_lists(world_size))
    stage = draw(st.sampled_from(stages))
    trace = draw(traces(units))
    biggest = max(u.param_nbytes for u in units)
    limit = draw(st.sampled_from([1 << 62, biggest, 2 * biggest, 3 * biggest + 1]))
    knobs = Knobs(prefetch=draw(st.booleans()), max_live_nbytes=limit)
    shard_world = world_size if stage > 0 else 1
    optimizer_numel = sum(u.param_nbytes for u in units if u.has_trainable) // 2 // shard_world
    schedule = compile_schedule(
        units,
        stage=stage,
        world_size=world_size,
        trace=trace,
        traced=True,
        optimizer_numel=optimizer_numel,
        grad_shard_nbytes=4 * optimizer_numel,
        knobs=knobs,
    )
    return schedule, knobs


def peak_gathered_nbytes(schedule: Schedule) -> int:
    """Most gathered parameter bytes alive after any op of a stage-3 micro-step."""
    size = {u.index: u.param_nbytes for u in schedule.units}
    alive: set[int] = set()
    peak = 0
    for entry in schedule.micro_step:
        for op in entry.ops:
            if isinstance(op, O.AllGather):
                alive.add(op.unit)
            elif isinstance(op, O.Release):
                alive.discard(op.unit)
            peak = max(peak, sum(size[i] for i in alive))
    return peak


@settings(max_examples=100, deadline=None)
@given(schedules())
def test_compiled_schedules_keep_every_invariant(drawn):
    """Whatever the units, trace, stage, world size and knobs, the compiler's output passes
    verify, with live gathered bytes within the limit (or the on-demand peak, when even
    gathering one unit at a time cannot stay under it)."""
    schedule, knobs = drawn
    verify(schedule)
    on_demand = replace(knobs, prefetch=False)
    baseline = compile_schedule(
        schedule.units,
        stage=schedule.stage,
        world_size=schedule.world_size,
        trace=tuple(e.trigger for e in schedule.micro_step),
        traced=True,
        optimizer_numel=1,
        grad_shard_nbytes=4,
        knobs=on_demand,
    )
    verify(schedule, max_live_nbytes=max(knobs.max_live_nbytes, peak_gathered_nbytes(baseline)))


# -- hand-broken schedules ---------------------------------------------------------------------

UNITS = (
    UnitInfo(0, "", 100, 200, 200, 400, True),
    UnitInfo(1, "blocks.0", 50, 100, 100, 200, True),
    UnitInfo(2, "blocks.1", 50, 100, 100, 200, True),
    UnitInfo(3, "blocks.2", 50, 100, 100, 200, True),
)


def compiled(stage: int, prefetch: bool = False) -> Schedule:
    schedule = compile_schedule(
        UNITS,
        stage=stage,
        world_size=4,
        trace=presumed_trace(UNITS),
        traced=True,
        optimizer_numel=100,
        grad_shard_nbytes=400,
        knobs=Knobs(prefetch=prefetch),
    )
    verify(schedule)  # the unbroken schedule passes
    return schedule


@dataclass(frozen=True)
class At:
    phase: str  # "micro_step" or "step"
    entry: int
    op: int


def find(schedule: Schedule, kind: type, unit: int = -1, trigger: str | None = None) -> At:
    """Where the first ``kind`` op (of ``unit``, at a trigger printed as ``trigger``) is."""
    for phase in ("micro_step", "step"):
        for i, entry in enumerate(getattr(schedule, phase)):
            if trigger is not None and str(entry.trigger) != trigger:
                continue
            for j, op in enumerate(entry.ops):
                if isinstance(op, kind) and getattr(op, "unit", -1) == unit:
                    return At(phase, i, j)
    raise LookupError(f"no {kind.__name__} of unit {unit}")


def entry_at(schedule: Schedule, trigger: str) -> At:
    for phase in ("micro_step", "step"):
        for i, entry in enumerate(getattr(schedule, phase)):
            if str(entry.trigger) == trigger:
                return At(phase, i, len(entry.ops))
    raise LookupError(trigger)


def edit(schedule: Schedule, at: At, *, remove: int = 0, insert: tuple[O.Op, ...] = ()):
    entries = list(getattr(schedule, at.phase))
    ops = list(entries[at.entry].ops)
    ops[at.op : at.op + remove] = insert
    entries[at.entry] = replace(entries[at.entry], ops=tuple(ops))
    return replace(schedule, **{at.phase: tuple(entries)})


def op_at(schedule: Schedule, at: At) -> O.Op:
    return getattr(schedule, at.phase)[at.entry].ops[at.op]


def remove(schedule: Schedule, kind: type, unit: int = -1, trigger: str | None = None):
    return edit(schedule, find(schedule, kind, unit, trigger), remove=1)


def move(schedule: Schedule, kind: type, unit: int, to: str, trigger: str | None = None):
    """Move an op to the end of the entry at trigger ``to``."""
    at = find(schedule, kind, unit, trigger)
    op = op_at(schedule, at)
    return edit(edit(schedule, at, remove=1), entry_at(schedule, to), insert=(op,))


def duplicate(schedule: Schedule, kind: type, unit: int = -1, trigger: str | None = None):
    at = find(schedule, kind, unit, trigger)
    return edit(schedule, replace(at, op=at.op + 1), insert=(op_at(schedule, at),))


def broken(
    schedule: Schedule, invariant: str, *fragments: str, unit: int | None = None, **kwargs
) -> ScheduleInvariantError:
    with pytest.raises(ScheduleInvariantError) as info:
        verify(schedule, **kwargs)
    error = info.value
    assert error.invariant == invariant, str(error)
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in {error}"
    if unit is not None:
        assert error.unit == unit, str(error)
    return error


def test_error_names_position_op_and_unit_and_is_a_schedule_error():
    schedule = duplicate(compiled(3), O.AllGather, 2, "pre_forward(2)")
    error = broken(
        schedule,
        "gather-once",
        "micro_step[3] @pre_forward(2) op 1",
        "'AllGather unit 2 (blocks.1) 100 B'",
        "unit 2 (blocks.1)",
        unit=2,
    )
    assert isinstance(error, ScheduleError) and isinstance(error, RuntimeError)


def test_wait_gather_missing_is_use_before_gather():
    schedule = remove(compiled(3), O.WaitGather, 2, "pre_forward(2)")
    broken(schedule, "gather-before-use", "@pre_forward(2)", "in flight", unit=2)


def test_gather_missing_is_use_before_gather():
    schedule = remove(
        remove(compiled(3), O.WaitGather, 3, "pre_backward(3)"), O.AllGather, 3, "pre_backward(3)"
    )
    broken(schedule, "gather-before-use", "@pre_backward(3)", "not gathered", unit=3)


def test_wait_gather_without_gather():
    schedule = remove(compiled(3), O.AllGather, 1, "pre_forward(1)")
    broken(schedule, "wait-after-gather", "WaitGather unit 1", unit=1)
    broken(duplicate(compiled(3), O.WaitGather, 1), "wait-after-gather", unit=1)


def test_release_before_last_use():
    schedule = move(compiled(3), O.Release, 0, "post_forward(2)")
    broken(schedule, "release-after-last-use", "@post_forward(2)", "during its forward", unit=0)
    schedule = move(compiled(3), O.Release, 0, "post_backward(1)", trigger="post_backward(0)")
    broken(schedule, "release-after-last-use", "@post_backward(1)", "during its backward", unit=0)


def test_release_of_a_unit_not_gathered():
    broken(duplicate(compiled(3), O.Release, 1), "release-after-gather", "not gathered", unit=1)
    schedule = move(compiled(3), O.Release, 1, "pre_forward(1)")  # right after its AllGather
    schedule = remove(schedule, O.WaitGather, 1, "pre_forward(1)")
    broken(schedule, "release-after-gather", "in flight", unit=1)


def test_release_below_stage_3():
    schedule = edit(
        compiled(2),
        entry_at(compiled(2), "post_forward(1)"),
        insert=(O.Release(1, "blocks.0", 100),),
    )
    broken(schedule, "release-stage-3-only", unit=1)


def test_gathering_an_alive_unit():
    broken(duplicate(compiled(3), O.AllGather, 2), "gather-once", "already alive", unit=2)
    schedule = edit(
        compiled(2),
        entry_at(compiled(2), "pre_forward(1)"),
        insert=(O.AllGather(1, "blocks.0", 100), O.WaitGather(1, "blocks.0")),
    )
    broken(schedule, "gather-once", unit=1)
    schedule = edit(
        compiled(0),
        entry_at(compiled(0), "step"),
        insert=(O.AllGather(1, "blocks.0", 100), O.WaitGather(1, "blocks.0")),
    )
    broken(schedule, "gather-once", "stage 0", unit=1)


def test_max_live_bytes():
    broken(
        compiled(3, prefetch=True),
        "max-live-bytes",
        "exceed max_live_nbytes=300",
        max_live_nbytes=300,
    )
    verify(compiled(3, prefetch=False), max_live_nbytes=300)


def test_zero_grad_missing_before_backward():
    schedule = remove(compiled(3), O.DropGrads, 2)
    broken(schedule, "zero-grad-before-backward", "@pre_backward(2)", "DropGrads", unit=2)


def test_zero_grad_that_discards_an_unreduced_gradient():
    schedule = edit(
        compiled(1),
        entry_at(compiled(1), "pre_backward(2)"),
        insert=(O.ZeroGrad(2, "blocks.1", 100),),
    )
    broken(schedule, "zero-grad-before-backward", "micro-batch 2", "discards", unit=2)


def test_zero_grad_while_the_reduction_reads_the_buffer():
    schedule = compiled(1)
    at = find(schedule, O.ReduceScatter, 2)
    schedule = edit(schedule, replace(at, op=at.op + 1), insert=(O.ZeroGrad(2, "blocks.1", 100),))
    broken(schedule, "zero-grad-before-backward", "in flight", unit=2)


def test_gradient_reduced_twice():
    schedule = duplicate(compiled(3), O.ReduceScatter, 2)
    broken(schedule, "reduce-once", "reduced twice", "first at micro_step[", unit=2)


def test_gradient_never_reduced():
    schedule = remove(remove(compiled(2), O.WaitReduce, 1), O.ReduceScatter, 1)
    broken(schedule, "reduce-once", "end of micro_step", "never reduced", unit=1)
    schedule = remove(remove(compiled(0), O.WaitReduce, 1), O.AllReduce, 1)
    broken(schedule, "reduce-once", "ReduceScalars", "never reduced in this step", unit=1)


def test_stage_0_and_1_reduce_in_the_step_phase_only():
    schedule = move(compiled(1), O.ReduceScatter, 2, "post_backward(2)")
    broken(schedule, "reduce-once", "in the micro_step", unit=2)


def test_reduction_kind_matches_the_stage():
    schedule = compiled(1)
    at = find(schedule, O.ReduceScatter, 3)
    schedule = edit(schedule, at, remove=1, insert=(O.AllReduce(3, "blocks.2", 200),))
    broken(schedule, "reduce-kind", "ReduceScatter, not AllReduce", unit=3)


def test_reduce_before_backward_finished():
    schedule = compiled(3)
    for kind in (O.ReduceScatter, O.WaitReduce):
        schedule = move(schedule, kind, 0, "post_backward(3)")
    broken(schedule, "reduce-after-backward", "@post_backward(3)", "before its backward", unit=0)


def test_backward_after_the_reduction():
    schedule = move(compiled(3), O.DropGrads, 1, "pre_backward(0)")
    for kind in (O.ReduceScatter, O.WaitReduce):
        schedule = move(schedule, kind, 1, "post_backward(2)")
    broken(schedule, "reduce-after-backward", "@pre_backward(1)", "would be lost", unit=1)


def test_wait_reduce_without_reduction():
    schedule = remove(compiled(2), O.ReduceScatter, 3)
    broken(schedule, "wait-after-reduce", "WaitReduce unit 3", unit=3)


def test_optimizer_reads_gradients_in_flight():
    schedule = move(compiled(1), O.WaitReduce, 2, "step")
    broken(schedule, "optimizer-after-reduce", "ReduceScalars", "in flight", unit=2)


def test_optimizer_before_reduce_scalars():
    schedule = remove(compiled(3), O.ReduceScalars)
    broken(schedule, "optimizer-after-reduce", "global norm")


def test_optimizer_step_missing_or_doubled():
    broken(remove(compiled(0), O.OptimizerStep), "optimizer-after-reduce", "no OptimizerStep")
    broken(remove(compiled(3), O.OptimizerStep), "grad-shard", "before OptimizerStep read")
    broken(duplicate(compiled(2), O.OptimizerStep), "optimizer-after-reduce", "twice")


def test_micro_step_ends_with_nothing_gathered_in_stage_3():
    schedule = remove(compiled(3), O.Release, 2, "post_backward(2)")
    broken(schedule, "end-of-micro-step", "end of micro_step", "still gathered", unit=2)


def test_micro_step_ends_with_no_reduction_in_flight():
    schedule = remove(compiled(3), O.WaitReduce, 0)
    broken(schedule, "end-of-micro-step", "WaitReduce missing", unit=0)


def test_stage_1_and_2_refresh_parameters_after_the_optimizer():
    schedule = remove(remove(compiled(2), O.WaitGather, 2), O.AllGather, 2)
    broken(schedule, "refresh-after-optimizer", "end of step", "not re-gathered", unit=2)
    schedule = compiled(1)
    at = find(schedule, O.AllGather, 2)
    op = op_at(schedule, at)
    schedule = edit(edit(schedule, at, remove=1), At("step", 0, 0), insert=(op,))
    broken(schedule, "refresh-after-optimizer", "before OptimizerStep", unit=2)


def test_gradient_shard_lifecycle():
    """Stages 1-3 hold the gradient shard from a step's first reduction to its optimizer step:
    allocated before a reduction lands in it, freed after OptimizerStep and before the step
    ends. Stage 0 keeps it across steps."""
    broken(remove(compiled(1), O.ZeroGradShard), "grad-shard", "not allocated")
    broken(remove(compiled(1), O.FreeGradShard), "end-of-step", "FreeGradShard missing")
    # Stages 2 and 3 allocate it in the micro-step, right before the first ReduceScatter.
    for stage in (2, 3):
        schedule = remove(compiled(stage), O.AllocGradShard)  # the micro-step's
        broken(schedule, "grad-shard", "step 1, micro-batch 1", "not allocated")
        schedule = remove(compiled(stage), O.FreeGradShard)
        broken(schedule, "end-of-step", f"stage {stage} keeps", "FreeGradShard missing")
    schedule = compiled(1)
    at = find(schedule, O.FreeGradShard)
    op = op_at(schedule, at)
    schedule = edit(edit(schedule, at, remove=1), find(schedule, O.ReduceScalars), insert=(op,))
    broken(schedule, "grad-shard", "before OptimizerStep read them")
    # Freed between micro-batches, the first micro-batch's reductions would be lost.
    schedule = compiled(3)
    at = entry_at(schedule, "backward_end")
    schedule = edit(schedule, at, insert=(O.FreeGradShard(400),))
    broken(schedule, "grad-shard", "micro-batch 1", "before OptimizerStep read them")
    schedule = edit(compiled(0), entry_at(compiled(0), "step"), insert=(O.FreeGradShard(400),))
    broken(schedule, "end-of-step", "stage 0 frees its gradient shard")


def test_step_zero_grad_shard_only_matters_when_nothing_was_reduced():
    """In stages 2 and 3 the step's ZeroGradShard finds the shard alive whenever a unit was
    reduced in the micro-step (removing it changes nothing); with no backward at all it is what
    allocates the shard the optimizer reads."""
    verify(remove(compiled(3), O.ZeroGradShard, trigger="step"))
    # A pre_forward and a post_forward per unit, then straight to the end of backward.
    forward_only = presumed_trace(UNITS)[: 2 * len(UNITS)] + (O.Trigger(O.BACKWARD_END),)
    for stage in (2, 3):
        schedule = compile_schedule(
            UNITS,
            stage=stage,
            world_size=4,
            trace=forward_only,
            traced=True,
            optimizer_numel=100,
            grad_shard_nbytes=400,
            knobs=Knobs(prefetch=False),
        )
        verify(schedule)
        assert not any(isinstance(op, O.ReduceScatter) for op in schedule.ops())
        schedule = remove(schedule, O.ZeroGradShard, trigger="step")
        broken(schedule, "grad-shard", "ReduceScalars reads a gradient shard that is not allocated")


def test_stage_0_gradients_are_zeroed_for_the_next_step():
    schedule = remove(compiled(0), O.ZeroGrad, 3)
    broken(schedule, "end-of-step", "not zeroed", unit=3)


def test_unknown_op_is_reported():
    @dataclass(frozen=True)
    class Mystery(O.Op):
        pass

    schedule = edit(compiled(3), At("step", 0, 0), insert=(Mystery(),))
    broken(schedule, "known-op", "Mystery")


def test_collective_signature_tracks_collective_order_only():
    plain, prefetched = compiled(3), compiled(3, prefetch=True)
    assert collective_signature(plain) == collective_signature(compiled(3))
    assert collective_signature(plain) != collective_signature(prefetched)
    assert len(collective_signature(plain)) == 64
    # Non-collective ops (sizes of this rank's shard) may differ between ranks.
    other_rank = compile_schedule(
        UNITS,
        stage=3,
        world_size=4,
        trace=presumed_trace(UNITS),
        traced=True,
        optimizer_numel=90,
        grad_shard_nbytes=360,
        knobs=Knobs(prefetch=False),
    )
    assert collective_signature(other_rank) == collective_signature(plain)
    assert collective_signature(remove(plain, O.Release, 1)) == collective_signature(plain)
    assert collective_signature(remove(plain, O.AllGather, 1)) != collective_signature(plain)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_schedules_traced_from_a_real_model_pass_on_every_rank(stage):
    """The schedules ``fzero.shard`` compiles after tracing a real model's first step (tied,
    shared and frozen parameters, two thread ranks) pass, with one collective signature."""
    import torch

    import fzero
    from fzero.collectives import run_ranks
    from tests.models import ToyLM, ToySpec

    spec = ToySpec(vocab=5, width=3, depth=3, tied=True, shared_block_weight=True, frozen=True)
    models = [ToyLM(spec) for _ in range(2)]
    ids = torch.randint(spec.vocab, (2, 3), generator=torch.Generator().manual_seed(0))
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=stage, config=config, process_group=comm)
        state, _ = fzero.train_step(state, [(ids, ids), (ids, ids)])
        return state.schedule

    schedules = run_ranks(2, rank)
    for schedule in schedules:
        assert schedule.traced
        verify(schedule)
    assert collective_signature(schedules[0]) == collective_signature(schedules[1])


# -- schedules as JSON --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(schedules())
def test_json_round_trip_gives_the_same_schedule(drawn):
    schedule, _ = drawn
    text = schedule_to_json(schedule)
    assert schedule_from_json(text) == schedule
    assert schedule_from_json(schedule_to_json(schedule, indent=None)) == schedule
    document = json.loads(text)
    first_op = document["step"][0]["ops"][0]
    assert first_op["op"] == type(schedule.step[0].ops[0]).__name__


def test_json_names_ops_by_class_and_refuses_unknown_ones():
    text = schedule_to_json(compiled(3))
    document = json.loads(text)
    assert document["micro_step"][0]["ops"][0] == {
        "op": "AllGather",
        "unit": 0,
        "name": "",
        "nbytes": 200,
    }
    document["step"][0]["ops"][0]["op"] = "Teleport"
    with pytest.raises(ScheduleError, match="unknown op 'Teleport'"):
        schedule_from_json(json.dumps(document))
    with pytest.raises(ScheduleError, match="not an fzero.schedule"):
        schedule_from_json(json.dumps({"format": "other"}))
