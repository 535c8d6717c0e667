"""What runs is what the schedule says, and stage 3 holds only what it must."""

from __future__ import annotations

import pytest
import torch

from fzero.schedule import verify
from fzero.schedule.compile import on_demand
from fzero.schedule.ops import (
    AllGather,
    Entry,
    ReduceScatter,
    Release,
    WaitGather,
    WaitReduce,
)
from tests.harness import Case, train_threads
from tests.models import ToyLM, ToySpec


def _ops(entries: tuple[Entry, ...] | list[Entry]) -> list:
    return [op for entry in entries for op in entry.ops]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", [True, False])
def test_executed_ops_equal_compiled_schedule(stage, overlap):
    """Every step runs exactly schedule.ops(micro_batches); the first step, which traces the
    order, runs the order-free on-demand ops for its first micro-batch."""
    torch.set_num_threads(1)
    micro = 2
    case = Case(
        ToySpec(depth=3, width=5, frozen=True),
        2,
        stage,
        micro,
        steps=1,
        extra={
            "zero_optimization": {
                "overlap_comm": overlap,
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": 0,
            }
        },
    )
    models_per_step = []
    for full, state, _ in train_threads(case, record=True):
        executor = state.runtime.executor
        schedule = executor.schedule
        assert schedule.traced
        trace = tuple(entry.trigger for entry in schedule.micro_step)
        first = _ops(on_demand(schedule.units, stage, 2, trace, executor.grad_shard_nbytes))
        expected = first + _ops(schedule.micro_step) * (micro - 1) + _ops(schedule.step)
        assert executor.executed == expected
        models_per_step.append(full)
    # Later steps run the compiled schedule itself.
    case = Case(case.spec, 2, stage, micro, steps=3, extra=case.extra)
    for _, state, _ in train_threads(case, record=True):
        executor = state.runtime.executor
        per_step = len(first) + len(_ops(executor.schedule.micro_step)) * (micro - 1)
        per_step += len(_ops(executor.schedule.step))
        later = executor.executed[per_step:]
        assert later == executor.schedule.ops(micro) * 2


@pytest.mark.parametrize("overlap", [True, False])
def test_stage3_holds_only_what_the_schedule_accounts(overlap):
    """At every trigger the gathered parameter bytes allocated equal what the schedule's ops
    leave gathered, gradients alive stay within the schedule's live_nbytes, and nothing exceeds
    the root unit plus the blocks the schedule must hold at once (one, or two with prefetch)."""
    torch.set_num_threads(1)
    case = Case(
        ToySpec(depth=4, width=7),
        2,
        3,
        1,
        steps=3,
        extra={
            "zero_optimization": {
                "overlap_comm": overlap,
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": 0,
            }
        },
    )
    for _, state, _ in train_threads(case, record=True):
        executor = state.runtime.executor
        schedule = executor.schedule
        by_index = {u.index: u for u in schedule.units}
        gathered: set[int] = set()
        expected_params = {}
        for entry in schedule.micro_step:
            for op in entry.ops:
                if isinstance(op, AllGather):
                    gathered.add(op.unit)
                elif isinstance(op, Release):
                    gathered.discard(op.unit)
            expected_params[entry.trigger] = sum(by_index[i].param_nbytes for i in gathered)
        live = {e.trigger: e.live_nbytes for e in schedule.micro_step}
        compiled_steps = executor.live_log[len(schedule.micro_step) :]
        assert compiled_steps, "no compiled micro-step ran"
        for trigger, params, grads in compiled_steps:
            assert params == expected_params[trigger], f"{trigger}: {params} B gathered"
            assert params + grads <= live[trigger], f"{trigger}: {params + grads} B alive"
        root = next(u for u in schedule.units if u.is_root)
        blocks = sorted((u for u in schedule.units if not u.is_root), key=lambda u: -u.param_nbytes)
        held = 2 if overlap else 1
        bound = (
            root.param_nbytes
            + root.grad_nbytes
            + sum(u.param_nbytes + u.grad_nbytes for u in blocks[:held])
        )
        assert max(params + grads for _, params, grads in executor.live_log) <= bound
        assert executor.measured_live_nbytes() == 0  # nothing stays gathered between steps


def test_schedule_prints_every_op_with_sizes():
    torch.set_num_threads(1)
    case = Case(ToySpec(depth=2, width=5), 1, 3, 1, steps=1)
    _, state, _ = train_threads(case)[0]
    text = str(state.schedule)
    for op in state.schedule.ops(1):
        assert str(op) in text
    assert "stage 3" in text and "blocks.1" in text and "live" in text


@pytest.mark.parametrize("reuse_blocks", [0, 2, 100])
def test_reuse_distance_keeps_the_last_blocks_gathered_into_backward(reuse_blocks):
    """stage3_max_reuse_distance (elements gathered in between) decides which blocks skip the
    release after forward and the re-gather before backward: the last block is reused at
    distance 0, block k at twice the elements of the blocks after it. The model trains the
    same either way."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=4, width=7)
    block_numel = sum(p.numel() for p in ToyLM(spec).blocks[0].parameters())
    reuse = reuse_blocks * block_numel
    case = Case(
        spec, 2, 3, 1, steps=2, extra={"zero_optimization": {"stage3_max_reuse_distance": reuse}}
    )
    results = train_threads(case)
    schedule = results[0][1].schedule
    kept = {
        e.trigger.unit
        for e in schedule.micro_step
        if e.trigger.kind == "post_forward" and not any(isinstance(op, Release) for op in e.ops)
    }
    blocks = [u.index for u in schedule.units if not u.is_root]
    expected = {0: set(), 2: set(blocks[-2:]), 100: set(blocks)}[reuse_blocks]
    assert kept - {u.index for u in schedule.units if u.is_root} == expected
    for block in expected:  # kept blocks are not gathered again before their backward
        gathers = [op for op in schedule.ops(1) if isinstance(op, AllGather) and op.unit == block]
        assert len(gathers) == 1
    released = Case(
        spec, 2, 3, 1, steps=2, extra={"zero_optimization": {"stage3_max_reuse_distance": 0}}
    )
    for (full, _, _), (base, _, _) in zip(results, train_threads(released)):
        for name in full:
            assert torch.equal(full[name], base[name]), name


def test_persistence_threshold_keeps_small_units_gathered():
    """Stage 3 units below stage3_param_persistence_threshold (elements) are gathered once and
    kept: no gather or release in the micro-step, a refresh after the optimizer step, nothing
    freed between steps; the model trains bit for bit as with every unit released."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=3, width=7)
    block_numel = sum(p.numel() for p in ToyLM(spec).blocks[0].parameters())
    threshold = block_numel + 1  # the blocks persist, the root (embedding, head) does not
    case = Case(
        spec,
        2,
        3,
        2,
        steps=3,
        extra={"zero_optimization": {"stage3_param_persistence_threshold": threshold}},
    )
    results = train_threads(case)
    schedule = results[0][1].schedule
    kept = {u.index for u in schedule.units if u.persistent}
    assert kept == {u.index for u in schedule.units if not u.is_root}
    micro_ops = [op for e in schedule.micro_step for op in e.ops]
    assert not [op for op in micro_ops if isinstance(op, (AllGather, Release)) and op.unit in kept]
    refreshed = {op.unit for e in schedule.step for op in e.ops if isinstance(op, AllGather)}
    assert refreshed == kept
    executor = results[0][1].runtime.executor
    assert executor.measured_param_nbytes() == sum(
        u.param_nbytes for u in schedule.units if u.persistent
    )
    released = Case(spec, 2, 3, 2, steps=3)
    for (full, _, _), (base, _, _) in zip(results, train_threads(released)):
        for name in full:
            assert torch.equal(full[name], base[name]), name


@pytest.mark.parametrize("bucket_blocks", [0, 2, 100])
def test_prefetch_bucket_bounds_the_gathers_in_flight(bucket_blocks):
    """stage3_prefetch_bucket_size (elements) lets gathers run further ahead: the elements in
    flight (issued, not yet waited on) after any trigger stay within the bucket plus the one
    unit every prefetch may take; a large bucket issues several gathers at once; the schedule
    verifies and trains bit for bit like one unit ahead."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=4, width=7)
    block_numel = sum(p.numel() for p in ToyLM(spec).blocks[0].parameters())
    bucket = bucket_blocks * block_numel
    knobs = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": bucket}
    results = train_threads(Case(spec, 2, 3, 1, steps=2, extra={"zero_optimization": knobs}))
    schedule = results[0][1].schedule
    verify(schedule)
    by_index = {u.index: u for u in schedule.units}
    largest = max(u.numel for u in schedule.units)
    issued: set[int] = set()
    most = 0
    for entry in schedule.micro_step:
        for op in entry.ops:
            if isinstance(op, AllGather):
                issued.add(op.unit)
            elif isinstance(op, WaitGather):
                issued.discard(op.unit)
        in_flight = sum(by_index[u].numel for u in issued)
        assert in_flight <= bucket + largest
        most = max(most, len(issued))
    assert most >= (3 if bucket_blocks == 100 else 1)
    one_ahead = Case(
        spec,
        2,
        3,
        1,
        steps=2,
        extra={"zero_optimization": {**knobs, "stage3_prefetch_bucket_size": 0}},
    )
    for (full, _, _), (base, _, _) in zip(results, train_threads(one_ahead)):
        for name in full:
            assert torch.equal(full[name], base[name]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_reduce_bucket_lets_reductions_overlap_the_next_backward(stage):
    """reduce_bucket_size (elements, with overlap_comm): a reduction's wait moves to a later
    trigger while the reductions in flight fit in the bucket, all of them by the end of
    backward; 0 waits at once. Training is bit for bit the same either way."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=4, width=7)

    def run(bucket):
        knobs = {"reduce_bucket_size": bucket, "stage3_max_reuse_distance": 0}
        return train_threads(Case(spec, 2, stage, 2, steps=2, extra={"zero_optimization": knobs}))

    eager, deferred = run(0), run(10**9)
    for results, at_once in ((eager, True), (deferred, False)):
        schedule = results[0][1].schedule
        verify(schedule)
        for entry in schedule.micro_step:
            reduced = [op.unit for op in entry.ops if isinstance(op, ReduceScatter)]
            waited = [op.unit for op in entry.ops if isinstance(op, WaitReduce)]
            if at_once:
                assert reduced == waited, entry.trigger
            elif entry.trigger.kind == "backward_end":
                assert len(waited) == len([u for u in schedule.units if u.has_trainable])
            else:
                assert not waited, entry.trigger
    for (a, _, _), (b, _, _) in zip(eager, deferred):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_allgather_bucket_limits_the_refresh_gathers_in_flight():
    """allgather_bucket_size (elements): stages 1 and 2 refresh their parameters after the
    optimizer step one bucket at a time; 0 waits on each unit before the next; same training."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=3, width=7)
    runs = {}
    for bucket in (0, 10**9):
        case = Case(
            spec, 2, 2, 1, steps=2, extra={"zero_optimization": {"allgather_bucket_size": bucket}}
        )
        runs[bucket] = train_threads(case)
        ops = [
            op
            for e in runs[bucket][0][1].schedule.step
            for op in e.ops
            if isinstance(op, (AllGather, WaitGather))
        ]
        kinds = [type(op).__name__ for op in ops]
        if bucket == 0:
            assert kinds == ["AllGather", "WaitGather"] * (len(ops) // 2)
        else:
            half = len(ops) // 2
            assert kinds == ["AllGather"] * half + ["WaitGather"] * half
    for (a, _, _), (b, _, _) in zip(runs[0], runs[10**9]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
