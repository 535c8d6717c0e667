"""The CPU steps of stage-3 optimizer offload run in the next step's first forward
(``fzero.offload_update_in_forward``, ``ApplyPendingUpdate``): exact, and the state between
steps is complete.

Against the same configuration with every CPU step in the step phase the arithmetic is the same
(the same kernel, on the same values, with the same factors), so everything is compared bit for
bit: losses, the trained weights and moments, after steps with several micro-batches, clipping,
skipped fp16 steps, copies of a state holding a pending update, checkpoints, an evaluation
forward between steps, and a micro-batch that fails after the update began to apply.
"""

from __future__ import annotations

import optree
import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import BatchError, ScheduleInvariantError
from fzero.schedule import ops as O
from fzero.schedule import schedule_from_json, schedule_to_json, verify
from tests.harness import Case
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3, width=6, frozen=True)


def _config(case: Case, in_forward: bool, params: bool = False) -> dict:
    config = case.config()
    zero = dict(config["zero_optimization"], stage=3)
    zero["offload_optimizer"] = {"device": "cpu"}
    if params:
        zero["offload_param"] = {"device": "cpu"}
    fzero_block = dict(config.get("fzero", {}), offload_update_in_forward=in_forward)
    return {**config, "zero_optimization": zero, "fzero": fzero_block}


def _leaves(state) -> list[torch.Tensor]:
    return [state.master.clone(), state.exp_avg.clone(), state.exp_avg_sq.clone()]


def _train(case: Case, config: dict, world_size: int, between=None):
    models = [ToyLM(case.spec) for _ in range(world_size)]
    batches = case.batches()

    def rank(comm):
        state = fzero.shard(models[comm.rank], config=config, process_group=comm)
        losses = []
        for step in range(case.steps):
            micro = batches[step][comm.rank]
            state, metrics = fzero.train_step(state, micro if case.micro > 1 else micro[0])
            losses.append(float(metrics["loss"]))
            if between is not None:
                state = between(state, step, micro)
        full = fzero.full_state_dict(state)
        return full, losses, _leaves(state), state

    return run_ranks(world_size, rank)


def _assert_same(runs_a, runs_b) -> None:
    for (full_a, losses_a, leaves_a, _), (full_b, losses_b, leaves_b, _) in zip(
        runs_a, runs_b, strict=True
    ):
        assert losses_a == losses_b
        for name in full_a:
            assert torch.equal(full_a[name], full_b[name]), name
        for a, b in zip(leaves_a, leaves_b, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "world_size, micro, params, extra",
    [(2, 2, False, {}), (3, 1, True, {}), (1, 2, False, {"bf16": {"enabled": True}})],
)
def test_updates_in_forward_train_bit_for_bit_like_updates_in_the_step(
    world_size, micro, params, extra
):
    torch.set_num_threads(1)
    case = Case(SPEC, world_size, 3, micro, steps=4, clip=0.05, extra=extra)
    torch.manual_seed(0)
    in_step = _train(case, _config(case, False, params), world_size)
    torch.manual_seed(0)
    in_forward = _train(case, _config(case, True, params), world_size)
    _assert_same(in_step, in_forward)
    schedule = in_forward[0][3].schedule
    verify(schedule)
    first = [op for entry in schedule.micro_entries(micro == 1, first=True) for op in entry.ops]
    applied = [op.unit for op in first if isinstance(op, O.ApplyPendingUpdate)]
    gathered = [op.unit for op in first if isinstance(op, O.AllGather)]
    assert sorted(applied) == sorted(u.index for u in schedule.units if u.optimizer_numel)
    for unit in applied:  # each update comes before the unit's first gather
        order = [(getattr(op, "unit", None), type(op)) for op in first]
        assert order.index((unit, O.ApplyPendingUpdate)) < order.index((unit, O.AllGather))
    assert set(applied) <= set(gathered)
    assert not any(isinstance(op, O.HostOptimizerStep) for op in schedule.ops(micro))
    assert schedule_from_json(schedule_to_json(schedule)) == schedule
    assert "first micro-batch only" in str(schedule)


def test_a_state_holding_a_pending_update_is_complete(tmp_path):
    """A ``tree_map`` copy, a checkpoint and an evaluation forward of a state whose update is
    still pending all see exactly the state the step-phase configuration has."""
    torch.set_num_threads(1)
    case = Case(SPEC, 2, 3, 1, steps=3, clip=0.05)
    torch.manual_seed(0)
    reference = _train(case, _config(case, False), 2)
    evaluated: dict[int, list[torch.Tensor]] = {}

    def between(state, step, micro):
        assert state.pending.is_armed  # nothing applied yet: the next forward does it
        if step == 0:  # a copy trains on like the state it was copied from
            return optree.tree_map(torch.clone, state, namespace="fzero")
        if step == 1:  # an evaluation forward applies the update first
            with torch.no_grad():
                value = state.model(*micro[0])
            evaluated.setdefault(state.rank, []).append(value)
            assert not state.pending.is_armed
            return state
        return state

    torch.manual_seed(0)
    in_forward = _train(case, _config(case, True), 2, between)
    _assert_same(reference, in_forward)

    # A checkpoint of a pending state holds the update; loading it trains on identically.
    def save_and_load(comm):
        model = ToyLM(case.spec)
        state = fzero.shard(model, config=_config(case, True), process_group=comm)
        batches = case.batches()
        state, _ = fzero.train_step(state, batches[0][comm.rank][0])
        assert state.pending.is_armed
        fzero.save(state, tmp_path)
        loaded = fzero.load(
            tmp_path, ToyLM(case.spec), config=_config(case, True), process_group=comm
        )
        assert not loaded.pending.is_armed
        return _leaves(state), _leaves(loaded)

    for saved, loaded in run_ranks(2, save_and_load):
        for a, b in zip(saved, loaded, strict=True):
            assert torch.equal(a, b)


def test_a_failed_micro_batch_after_a_pending_update_loses_nothing():
    """The update is applied unit by unit in the forward; a micro-batch that fails half-way
    leaves the state with all of it applied (its value unchanged), and training goes on as if
    the failure never happened."""
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=3, clip=0.05)
    torch.manual_seed(0)
    reference = _train(case, _config(case, True), 1)

    def fail_once(state, step, micro):
        if step == 0:
            ids, targets = micro[0]
            # Ids out of range fail in the root's embedding: its update is applied by then, the
            # blocks' are not.
            with pytest.raises(BatchError):
                fzero.train_step(state, (ids + 1000, targets))
            assert not state.pending.is_armed
        return state

    torch.manual_seed(0)
    failed = _train(case, _config(case, True), 1, fail_once)
    _assert_same(reference, failed)


def test_fp16_skipped_steps_leave_nothing_pending():
    torch.set_num_threads(1)
    fp16 = {"fp16": {"enabled": True, "initial_scale_power": 30, "hysteresis": 1}}
    case = Case(SPEC, 2, 3, 1, steps=3, extra=fp16)
    skipped: list[bool] = []

    def record(state, step, micro):
        skipped.append(bool(state.progress.skipped_count) and step == 0)
        if step == 0:
            assert not state.pending.is_armed
        return state

    torch.manual_seed(0)
    in_step = _train(case, _config(case, False), 2)
    torch.manual_seed(0)
    in_forward = _train(case, _config(case, True), 2, record)
    assert skipped[0], "2**30 overflows on the first step"
    _assert_same(in_step, in_forward)


def test_verify_refuses_a_gather_before_its_pending_update():
    torch.set_num_threads(1)
    case = Case(SPEC, 1, 3, 1, steps=1)
    state = fzero.shard(ToyLM(SPEC), config=_config(case, True))
    state, _ = fzero.train_step(state, case.batches()[0][0][0])
    schedule = state.schedule
    extra = schedule.first_micro_extra
    # Move the first unit's update after its gather: a forward on the old values.
    first, *rest = extra
    late = O.Entry(first.trigger, ())
    moved = [op for op in first.ops]
    entries = list(schedule.micro_step)
    index = next(i for i, e in enumerate(entries) if e.trigger == first.trigger)
    entries[index] = O.Entry(entries[index].trigger, entries[index].ops + tuple(moved))
    broken = type(schedule)(
        schedule.stage,
        schedule.world_size,
        schedule.units,
        tuple(entries),
        schedule.step,
        schedule.traced,
        last_micro_step=schedule.last_micro_step,
        gradient_reduction=schedule.gradient_reduction,
        first_micro_extra=(late, *rest),
    )
    with pytest.raises(ScheduleInvariantError, match="pending-update"):
        verify(broken)
