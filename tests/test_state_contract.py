"""The state contract: all progress is in the state's leaves, a tree_map copy of a state is a
state, and train_step is micro_step x k then apply_step. One op vocabulary for the compiler,
verify, simulate and the executor."""

from __future__ import annotations

import importlib
import inspect

import optree
import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import DonatedStateError
from fzero.runtime import executor as executor_module
from fzero.runtime import gathers, reductions, step_phase
from fzero.schedule import CostModel, simulate, verify
from fzero.schedule import ops as O
from fzero.schedule.verify import _Checker
from fzero.train import apply_step, micro_step
from tests.harness import Case
from tests.models import ToyLM, ToySpec, make_batches

SPEC = ToySpec(depth=3, width=6, frozen=True)


def _clone(state):
    return optree.tree_map(torch.clone, state, namespace=fzero.NAMESPACE)


def _leaves(state):
    return [t.clone() for t in optree.tree_leaves(state, namespace=fzero.NAMESPACE)]


def _fp16_case(stage: int, world_size: int) -> Case:
    # fp16 with a loss scale that overflows once, so the scaler's counters move.
    return Case(
        SPEC,
        world_size,
        stage,
        2,
        steps=4,
        extra={"fp16": {"enabled": True, "initial_scale_power": 30, "loss_scale_window": 2}},
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_tree_map_copy_trains_bitwise_like_the_original(stage):
    """Copy the state after one step, train the original two more steps, then train the copy
    the same two steps: every leaf (buffers and progress) and every metric is identical."""
    torch.set_num_threads(1)
    case = _fp16_case(stage, 2)
    batches = case.batches()

    def run(comm):
        torch.manual_seed(0)
        model = ToyLM(SPEC)
        state = fzero.shard(model, stage=stage, config=case.config(), process_group=comm)
        state, _ = fzero.train_step(state, batches[0][comm.rank])
        copy = _clone(state)
        first = []
        for step in (1, 2):
            state, metrics = fzero.train_step(state, batches[step][comm.rank])
            first.append((float(metrics["loss"]), metrics["loss_scale"], metrics["step"]))
        original = _leaves(state)
        original_params = fzero.full_state_dict(state)
        second = []
        for step in (1, 2):
            copy, metrics = fzero.train_step(copy, batches[step][comm.rank])
            second.append((float(metrics["loss"]), metrics["loss_scale"], metrics["step"]))
        assert first == second
        for a, b in zip(original, _leaves(copy), strict=True):
            assert torch.equal(a, b)
        params = fzero.full_state_dict(copy)
        assert all(torch.equal(params[k], v) for k, v in original_params.items())
        # The state installed before the copy keeps its own values: training it goes on
        # exactly as training the copy's result would.
        state, m1 = fzero.train_step(state, batches[3][comm.rank])
        copy, m2 = fzero.train_step(copy, batches[3][comm.rank])
        assert float(m1["loss"]) == float(m2["loss"])
        for a, b in zip(_leaves(state), _leaves(copy), strict=True):
            assert torch.equal(a, b)
        return True

    assert all(run_ranks(2, run))


def test_progress_lives_in_the_state():
    """Step count, skipped steps and the loss scaler's position are leaves; the runtime holds
    none of them."""
    torch.set_num_threads(1)
    case = _fp16_case(2, 1)
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=2, config=case.config())
    batches = case.batches()
    state, metrics = fzero.train_step(state, batches[0][0])
    assert metrics["skipped"], "the first fp16 step at 2**30 overflows"
    names = {
        str(path)
        for path in optree.tree_paths(state, namespace=fzero.NAMESPACE)  # type: ignore[arg-type]
    }
    for counter in ("steps", "skipped_steps", "loss_scale", "scaler_iteration"):
        assert any(counter in name for name in names), names
    assert state.progress.step_count == 1 and state.progress.skipped_count == 1
    # DeepSpeed's default hysteresis of 2: the first overflow uses it up, the scale stays.
    assert float(state.progress.loss_scale) == 2.0**30
    assert int(state.progress.hysteresis_left) == 1 and int(state.progress.last_overflow) == 0
    for field in ("step_count", "skipped_steps", "loss_scaler", "live_state"):
        assert not hasattr(state.runtime, field)


def test_donated_states_are_refused_and_fresh_copies_are_not():
    torch.set_num_threads(1)
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=3, config=Case(SPEC, 1, 3, 1).config())
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    copy = _clone(state)
    new_state, _ = fzero.train_step(state, batch)
    with pytest.raises(DonatedStateError):
        fzero.train_step(state, batch)
    fzero.train_step(copy, batch)  # a copy taken before the donation is a state of its own
    with pytest.raises(DonatedStateError):
        fzero.train_step(copy, batch)
    fzero.train_step(new_state, batch)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_train_step_is_micro_steps_then_apply_step(stage):
    torch.set_num_threads(1)
    case = Case(SPEC, 1, stage, 3, steps=2)
    batches = case.batches()

    def train(split: bool):
        torch.manual_seed(0)
        state = fzero.shard(ToyLM(SPEC), stage=stage, config=case.config())
        losses = []
        for step in range(case.steps):
            micro_batches = batches[step][0]
            if split:
                for index, micro_batch in enumerate(micro_batches):
                    micro_step(state, micro_batch, index=index, count=len(micro_batches))
                state, metrics = apply_step(state, len(micro_batches))
            else:
                state, metrics = fzero.train_step(state, micro_batches)
            losses.append(float(metrics["loss"]))
        return losses, fzero.full_state_dict(state)

    (losses_a, params_a), (losses_b, params_b) = train(False), train(True)
    assert losses_a == losses_b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_the_schedule_printed_before_the_first_step_is_what_it_runs():
    """Before the first step the schedule is the on-demand one over the presumed order, and
    a model that runs in module order runs exactly its ops in its first micro-batch."""
    torch.set_num_threads(1)
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=3, config=Case(SPEC, 1, 3, 1).config(), record_ops=True)
    printed = state.schedule
    assert not printed.traced and "on-demand" in str(printed)
    verify(printed)
    batch = make_batches(SPEC, steps=1, world_size=1, micro=1)[0][0][0]
    state, _ = fzero.train_step(state, batch)
    executed = state.runtime.executor.executed
    first_micro = [op for entry in printed.micro_step for op in entry.ops]
    assert executed[: len(first_micro)] == first_micro


def test_one_op_vocabulary():
    """Every op type has exactly one executor handler, a verify rule and a simulate cost."""
    op_types = [
        value
        for value in vars(O).values()
        if isinstance(value, type) and issubclass(value, O.Op) and value is not O.Op
    ]
    model = ToyLM(SPEC)
    state = fzero.shard(model, stage=3, config=Case(SPEC, 1, 3, 1).config())
    handlers = state.runtime.executor.handlers
    assert set(handlers) == set(op_types)
    for op_type in op_types:
        assert hasattr(_Checker, f"op_{op_type.__name__}"), op_type
    source = inspect.getsource(importlib.import_module("fzero.schedule.simulate"))
    for op_type in op_types:
        assert f"O.{op_type.__name__}" in source, op_type
    assert simulate(state.schedule, CostModel()).step_seconds > 0


def test_handlers_never_ask_for_the_stage():
    """Where behaviour differs by stage the compiler emits a different op."""
    for module in (executor_module, gathers, reductions, step_phase):
        source = inspect.getsource(module)
        assert ".stage" not in source.replace("self.schedule.stage,", ""), module.__name__
