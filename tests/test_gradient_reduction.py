"""Where gradients are reduced: every micro-batch (stages 2, 3), once at the last micro-batch
(``reduce_every_micro_batch: false``), or in a fixed order (``deterministic``). The schedule
says which, and verify, simulate, serialize and the executor follow it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fzero.errors import ScheduleInvariantError
from fzero.schedule import (
    CostModel,
    Knobs,
    UnitInfo,
    compile_schedule,
    presumed_trace,
    schedule_from_json,
    schedule_to_json,
    simulate,
    verify,
)
from fzero.schedule import ops as O
from fzero.schedule.compile import on_demand
from tests.harness import Case, assert_close_to_reference, reference, train_threads
from tests.models import ToySpec

MiB = 1 << 20
UNITS = (
    UnitInfo(0, "", 1000, 4 * MiB, 4 * MiB, 4 * MiB, True),
    UnitInfo(1, "blocks.0", 1000, 4 * MiB, 4 * MiB, 4 * MiB, True),
    UnitInfo(2, "blocks.1", 1000, 4 * MiB, 4 * MiB, 4 * MiB, True),
)
LOCAL = {"fzero": {"reduce_every_micro_batch": False}}


def compiled(stage: int, reduction: str = "", world_size: int = 4):
    knobs = Knobs(gradient_reduction=reduction, grad_gather_nbytes=12 * MiB)
    return compile_schedule(
        UNITS,
        stage=stage,
        world_size=world_size,
        trace=presumed_trace(UNITS),
        traced=True,
        optimizer_numel=3 * MiB // 16,
        grad_shard_nbytes=3 * MiB,
        knobs=knobs,
    )


MODES = [(s, "") for s in range(4)] + [(2, "last_micro_batch"), (3, "last_micro_batch")]
MODES += [(s, "ordered") for s in range(4)]


@pytest.mark.parametrize(("stage", "reduction"), MODES)
def test_every_reduction_mode_verifies_simulates_and_round_trips(stage, reduction):
    schedule = compiled(stage, reduction)
    verify(schedule)
    assert schedule_from_json(schedule_to_json(schedule)) == schedule
    timeline = simulate(schedule, CostModel(), micro_batches=3)
    assert timeline.step_seconds > 0
    text = str(schedule)
    assert "gradients reduced:" in text
    if reduction == "last_micro_batch":
        assert "backward (last)" in text and "each micro-batch but the last" in text


def _reductions(ops) -> list[O.Op]:
    return [op for op in ops if isinstance(op, (O.ReduceScatter, O.AllReduce, O.ReduceInOrder))]


@pytest.mark.parametrize("stage", [2, 3])
def test_reducing_once_moves_one_reduction_per_unit_and_holds_full_gradients(stage):
    """With 4 micro-batches, reducing at the last one issues 3 reduce-scatters instead of 12,
    and the simulated peak holds every unit's full gradient (3 x 4 MiB) instead of the root's
    (alive through the whole backward) and one block's."""
    every, once = compiled(stage), compiled(stage, "last_micro_batch")
    assert len(_reductions(every.ops(4))) == 12 and len(_reductions(once.ops(4))) == 3
    assert _reductions(once.ops(1)) == _reductions(every.ops(1))
    peak_every = simulate(every, micro_batches=4).peak_memory.gradients
    peak_once = simulate(once, micro_batches=4).peak_memory.gradients
    assert peak_once - peak_every == 4 * MiB  # one more block's gradient held at once
    assert once.peak_live_nbytes > every.peak_live_nbytes


def test_ordered_mode_reduces_every_micro_batch_in_every_stage():
    for stage in range(4):
        ops = compiled(stage, "ordered").ops(2)
        reductions = _reductions(ops)
        assert len(reductions) == 6 and all(isinstance(op, O.ReduceInOrder) for op in reductions)
        assert all(op.whole_unit == (stage == 0) for op in reductions)
        assert sum(isinstance(op, O.ReduceScalarsInOrder) for op in ops) == 1
        assert not any(isinstance(op, O.ReduceScalars) for op in ops)


def _broken(schedule, invariant: str, *fragments: str) -> None:
    with pytest.raises(ScheduleInvariantError) as info:
        verify(schedule)
    assert info.value.invariant == invariant, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def _replace_ops(entries, change):
    return tuple(dataclasses.replace(e, ops=tuple(change(op) for op in e.ops)) for e in entries)


def test_verify_catches_broken_reduce_once_schedules():
    once = compiled(2, "last_micro_batch")
    # Reducing before the last micro-batch too: twice in one step.
    _broken(
        dataclasses.replace(once, micro_step=once.last_micro_step),
        "reduce-once",
        "reduce_every_micro_batch: false",
    )
    # ZeroGrad instead of AllocGrad throws away the earlier micro-batches' gradients.
    zeroing = _replace_ops(
        once.micro_step,
        lambda op: O.ZeroGrad(op.unit, op.name, op.nbytes) if isinstance(op, O.AllocGrad) else op,
    )
    _broken(dataclasses.replace(once, micro_step=zeroing), "zero-grad-before-backward", "never")


def test_verify_catches_unordered_reductions_in_deterministic_mode():
    ordered = compiled(2, "ordered")
    scattered = _replace_ops(
        ordered.micro_step,
        lambda op: (
            O.ReduceScatter(op.unit, op.name, op.nbytes) if isinstance(op, O.ReduceInOrder) else op
        ),
    )
    _broken(dataclasses.replace(ordered, micro_step=scattered), "reduce-kind", "ReduceInOrder")
    whole = _replace_ops(
        ordered.micro_step,
        lambda op: (
            dataclasses.replace(op, whole_unit=True) if isinstance(op, O.ReduceInOrder) else op
        ),
    )
    _broken(dataclasses.replace(ordered, micro_step=whole), "reduce-kind", "whole_unit=True")


# -- running it ----------------------------------------------------------------------------------


RUNS = [(2, LOCAL), (3, LOCAL)] + [(s, {"fzero": {"deterministic": True}}) for s in range(4)]


@pytest.mark.parametrize(
    ("stage", "extra"), RUNS, ids=[f"{s}-{sorted(e['fzero'])[0]}" for s, e in RUNS]
)
@pytest.mark.parametrize("world_size", [1, 3])
def test_other_reductions_train_like_the_reference_and_run_their_schedule(stage, extra, world_size):
    """Reduced once (gradients accumulated locally over 3 micro-batches) or in order, training
    matches the single-device reference (fp32, 1e-5); the first step runs the on-demand ops for
    its traced micro-batch and the schedule for the rest, later steps schedule.ops(3)."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=3, width=7, frozen=True)
    case = Case(spec, world_size, stage, micro=3, extra=extra)
    ref = reference(case)
    for full, state, _ in train_threads(case, record=True):
        assert_close_to_reference(full, ref, rtol=1e-5)
        executor = state.runtime.executor
        schedule = executor.schedule
        ordered = "deterministic" in extra["fzero"]
        assert schedule.gradient_reduction == ("ordered" if ordered else "last_micro_batch")
        trace = tuple(entry.trigger for entry in schedule.micro_step)
        traced = on_demand(
            schedule.units,
            stage,
            case.world_size,
            trace,
            executor.grad_shard_nbytes,
            reduction="ordered" if ordered else "",
        )
        traced_ops = [op for e in traced for op in e.ops]
        first_micro = [op for e in schedule.micro_step for op in e.ops]
        first_step = traced_ops + schedule.ops(3)[len(first_micro) :]
        assert executor.executed[: len(first_step)] == first_step
        assert executor.executed[len(first_step) :] == schedule.ops(3) * 2


def test_deterministic_runs_every_stage_the_same_in_bf16():
    """Deterministic mode with bf16 compute: every stage ends bit for bit where the others do."""
    torch.set_num_threads(1)
    spec = ToySpec(depth=2, width=8)
    results = []
    for stage in range(4):
        case = Case(spec, 3, stage, micro=2, deterministic=True, extra={"bf16": {"enabled": True}})
        results.append(train_threads(case)[0][0])
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
