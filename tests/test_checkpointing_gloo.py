"""Across two real gloo processes: activation checkpointing at stage 3 (torch's reentrant
checkpoint, and fzero's own with the inputs kept on the host) matches plain PyTorch with the
same checkpointing, and ``fzero.gathered(modifier_rank=1)`` writes rank 1's change into both
ranks' shards."""

from __future__ import annotations

import pytest
import torch

import fzero
from tests.gloo_pool import GlooPool
from tests.harness import Case, assert_close_to_reference, reference
from tests.test_activation_checkpointing import SPEC, CheckpointedLM

pytestmark = pytest.mark.slow
TIMEOUT_S = 90
EXTRA = {
    "reentrant": {},
    "plain": {"activation_checkpointing": {"number_checkpoints": 3, "cpu_checkpointing": True}},
}


@pytest.fixture(scope="module")
def pool():
    pool = GlooPool(2)
    yield pool
    pool.close()


def _case(how: str) -> Case:
    extra = {"zero_optimization": {"stage3_max_reuse_distance": 0}, **EXTRA[how]}
    return Case(SPEC, world_size=2, stage=3, micro=2, steps=2, extra=extra)


def _train(rank: int, world_size: int, how: str):
    case = _case(how)
    state = fzero.shard(CheckpointedLM(SPEC, how), stage=3, config=case.config())
    for step in case.batches():
        state, _ = fzero.train_step(state, step[rank])
    triggers = state.schedule.micro_step
    recomputes = [e.trigger.unit for e in triggers if e.trigger.kind == "pre_recompute"]
    return fzero.full_state_dict(state), recomputes


def _modify_on_rank_1(rank: int, world_size: int):
    model = CheckpointedLM(SPEC, "plain")
    state = fzero.shard(model, stage=3, config=_case("reentrant").config())
    before = fzero.full_state_dict(state)
    with fzero.gathered(state, modifier_rank=1), torch.no_grad():
        model.blocks[2].linear.bias.add_(float(rank + 1))
    return before, fzero.full_state_dict(state)


@pytest.mark.parametrize("how", sorted(EXTRA))
def test_gloo_checkpointed_stage_3_matches_pytorch(pool, how):
    expected_how = "non_reentrant" if how == "plain" else how
    expected = reference(_case(how), model=CheckpointedLM(SPEC, expected_how))
    for full, recomputes in pool.run(_train, how, timeout_s=TIMEOUT_S):
        assert_close_to_reference(full, expected)
        assert sorted(recomputes) == [1, 2, 3]


def test_gloo_gathered_writes_rank_1_change_into_both_ranks(pool):
    (before, after0), (_, after1) = pool.run(_modify_on_rank_1, timeout_s=TIMEOUT_S)
    name = "blocks.2.linear.bias"
    for after in (after0, after1):
        assert torch.equal(after[name], before[name] + 2.0)
        for other, value in before.items():
            if other != name:
                assert torch.equal(after[other], value), other
