"""Activation checkpointing: every way a unit's forward is recomputed in backward is a
``pre_recompute`` trigger of the schedule, and training matches plain PyTorch running the same
checkpointing."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ConfigError, ConfigWarning, ScheduleInvariantError
from fzero.schedule import CostModel, simulate, verify
from fzero.schedule import ops as O
from tests.harness import Case, assert_close_to_reference, reference, train_rank
from tests.models import ToyLM, ToySpec

SPEC = ToySpec(depth=3)
FZERO_CHECKPOINTS = {"activation_checkpointing": {"number_checkpoints": 2}}


class CheckpointedLM(ToyLM):
    """ToyLM whose blocks are recomputed in backward: ``how`` is ``reentrant`` or
    ``non_reentrant`` (``torch.utils.checkpoint`` around each block's call), ``wrapper``
    (torch's ``checkpoint_wrapper``) or ``plain`` (no checkpointing of its own)."""

    def __init__(self, spec: ToySpec, how: str):
        super().__init__(spec)
        self.how = how
        if how == "wrapper":
            for i, block in enumerate(self.blocks):
                self.blocks[i] = checkpoint_wrapper(block)

    def forward(self, ids, targets):
        if self.how not in ("reentrant", "non_reentrant"):
            return super().forward(ids, targets)
        x = self.embed(ids)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.how == "reentrant")
        logits = self.head(self.norm(x))
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        )


def _train(case: Case, how: str):
    models = [CheckpointedLM(case.spec, how) for _ in range(case.world_size)]
    results = run_ranks(
        case.world_size, lambda comm: train_rank(case, comm, models[comm.rank], record=True)
    )
    return results


def _reference(case: Case, how: str):
    # fzero's own checkpointing (number_checkpoints) against torch's checkpoint of the same
    # blocks: non-reentrant, as fzero wraps them.
    how = "non_reentrant" if how == "plain" else how
    return reference(case, model=CheckpointedLM(case.spec, how))


HOWS = ["reentrant", "non_reentrant", "wrapper", "plain"]


def _case(stage: int, world_size: int, how: str) -> Case:
    extra = {"zero_optimization": {"stage3_max_reuse_distance": 0}}
    if how == "plain":
        extra.update(FZERO_CHECKPOINTS)
    return Case(SPEC, world_size=world_size, stage=stage, micro=2, steps=2, extra=extra)


MATRIX = [(0, "reentrant"), (1, "wrapper"), (2, "non_reentrant"), (2, "plain")]
MATRIX += [(3, how) for how in HOWS]


@pytest.mark.parametrize(("stage", "how"), MATRIX)
def test_checkpointed_training_matches_pytorch_with_the_same_checkpointing(stage, how):
    case = _case(stage, 2, how)
    expected = _reference(case, how)
    for full, _state, _ in _train(case, how):
        assert_close_to_reference(full, expected)


@pytest.mark.parametrize(("world_size", "how"), [(1, "reentrant"), (3, "plain"), (3, "wrapper")])
def test_checkpointed_training_at_stage_3_on_one_and_three_ranks(world_size, how):
    case = _case(3, world_size, how)
    expected = _reference(case, how)
    for full, _state, _ in _train(case, how):
        assert_close_to_reference(full, expected)


def _recomputes(schedule) -> list[int]:
    return [e.trigger.unit for e in schedule.micro_step if e.trigger.kind == O.PRE_RECOMPUTE]


@pytest.mark.parametrize("how", HOWS)
def test_each_recompute_is_a_trigger_that_gathers_its_unit_once(how):
    """Stage 3, nothing kept for reuse: each block is gathered once for its forward and once
    for its recompute and backward together (not once more after a release at the end of the
    recompute), at the recompute's trigger or prefetched before it."""
    case = _case(3, 2, how)
    (_, state, _), _ = _train(case, how)
    schedule = state.schedule
    checkpointed = [1, 2, 3] if how != "plain" else [1, 2]
    assert sorted(_recomputes(schedule)) == checkpointed
    backward = False
    for entry in schedule.micro_step:
        backward = backward or entry.trigger.kind == O.PRE_BACKWARD
        for op in entry.ops:
            assert not (backward and isinstance(op, O.Release) and op.unit in checkpointed) or (
                entry.trigger.kind in (O.POST_BACKWARD, O.BACKWARD_END)
            )
    gathers = [op.unit for op in schedule.ops(1) if isinstance(op, O.AllGather)]
    for unit in checkpointed:
        assert gathers.count(unit) == 2, (unit, gathers)
    verify(schedule)


def test_fzero_checkpointing_is_in_the_schedule_before_the_first_step():
    model = ToyLM(SPEC)
    config = {**_case(3, 1, "plain").config()}
    state = fzero.shard(model, stage=3, config=config)
    presumed = [str(e.trigger) for e in state.schedule.micro_step]
    assert "pre_recompute(1)" in presumed and "pre_recompute(3)" not in presumed
    ids = torch.randint(11, (2, 5))
    state, _ = fzero.train_step(state, (ids, ids))
    assert [str(e.trigger) for e in state.schedule.micro_step] == presumed


def test_verify_rejects_a_release_between_a_recompute_and_its_backward():
    case = _case(3, 2, "reentrant")
    (_, state, _), _ = _train(case, "reentrant")
    schedule = state.schedule
    entries = list(schedule.micro_step)
    at = next(i for i, e in enumerate(entries) if e.trigger.kind == O.PRE_RECOMPUTE)
    unit = schedule.units[entries[at].trigger.unit]
    release = O.Release(unit.index, unit.name, unit.param_nbytes)
    entries[at + 1] = replace(entries[at + 1], ops=(release, *entries[at + 1].ops))
    broken = replace(schedule, micro_step=tuple(entries))
    with pytest.raises(ScheduleInvariantError, match="pre_recompute"):
        verify(broken)


def test_simulate_charges_a_forward_for_each_recompute():
    case = _case(3, 2, "plain")
    (_, checkpointed, _), _ = _train(case, "plain")
    plain_case = replace(case, extra={"zero_optimization": {"stage3_max_reuse_distance": 0}})
    (_, plain, _), _ = run_ranks(2, lambda comm: train_rank(plain_case, comm))
    cost = CostModel()
    extra = simulate(checkpointed.schedule, cost).compute_seconds
    extra -= simulate(plain.schedule, cost).compute_seconds
    recomputed = [u for u in checkpointed.schedule.units if u.index in (1, 2)]
    assert extra == pytest.approx(sum(cost.forward(u) for u in recomputed))


def test_cpu_checkpointing_keeps_the_checkpointed_inputs_off_the_callers_hooks():
    """The inputs a checkpointed unit keeps are saved by save_on_cpu, not by saved-tensor
    hooks around the step, and training is unchanged."""
    ids = torch.randint(11, (2, 5))
    saved_outside = {}
    for cpu in (False, True):
        blocks = {"number_checkpoints": 3, "cpu_checkpointing": cpu}
        config = {"activation_checkpointing": blocks, "optimizer": {"params": {"lr": 1e-2}}}
        state = fzero.shard(ToyLM(SPEC), stage=3, config=config)
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            state, metrics = fzero.train_step(state, (ids, ids))
        saved_outside[cpu] = (count[0], fzero.full_state_dict(state))
    assert saved_outside[True][0] < saved_outside[False][0]
    for name, value in saved_outside[False][1].items():
        assert torch.equal(saved_outside[True][1][name], value), name


def test_activation_checkpointing_config_keys():
    with pytest.raises(ConfigError, match="cpu_checkpointing.*number_checkpoints"):
        fzero.Config.from_dict({"activation_checkpointing": {"cpu_checkpointing": True}})
    with pytest.raises(ConfigError, match="number_checkpoints"):
        fzero.Config.from_dict({"activation_checkpointing": {"number_checkpoints": -1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = fzero.Config.from_dict(
            {"activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4}}
        )
    assert config.activation_checkpointing.number_checkpoints == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert any("partition_activations" in m and "model parallelism" in m for m in messages)
