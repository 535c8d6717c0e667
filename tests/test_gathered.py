"""``fzero.gathered``: the full parameters for a block, and writes from one rank kept."""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ShardError
from fzero.state.released import is_released
from tests.models import ToyLM, ToySpec

RELEASE_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
BF16 = {**RELEASE_ALL, "bf16": {"enabled": True}}


def _fp32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in tensors.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_inside_gathered_the_model_state_dict_is_the_full_one(stage):
    model = ToyLM(ToySpec())
    state = fzero.shard(model, stage=stage, config=RELEASE_ALL)
    ids = torch.randint(11, (2, 5))
    state, _ = fzero.train_step(state, (ids, ids))
    full = fzero.full_state_dict(state)
    with fzero.gathered(state):
        inside = _fp32(model.state_dict())
        assert not any(is_released(p) for p in model.parameters())
    assert list(inside) == list(full)
    for name, value in full.items():
        assert torch.equal(inside[name], value), name
    assert all(is_released(p) for p in model.parameters()) == (stage == 3)


def test_gathering_some_modules_leaves_the_others_released():
    model = ToyLM(ToySpec(depth=3))
    state = fzero.shard(model, stage=3, config=RELEASE_ALL)
    with fzero.gathered(state, [model.blocks[1]]):
        assert not is_released(model.blocks[1].linear.weight)
        assert is_released(model.blocks[0].linear.weight)
        assert is_released(model.embed.weight)
    assert is_released(model.blocks[1].linear.weight)
    with fzero.gathered(state, model.head.weight):  # the head's weight lives in the root unit
        assert not is_released(model.embed.weight)


def test_without_modifier_rank_a_change_is_not_kept():
    model = ToyLM(ToySpec())
    state = fzero.shard(model, stage=3, config=RELEASE_ALL)
    before = fzero.full_state_dict(state)
    with fzero.gathered(state), torch.no_grad():
        model.blocks[0].linear.weight.zero_()
    after = fzero.full_state_dict(state)
    assert torch.equal(after["blocks.0.linear.weight"], before["blocks.0.linear.weight"])


OFFLOAD = {
    **BF16,
    "zero_optimization": {
        "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "cpu"},
    },
}
BOTH_OFFLOADS = {
    **BF16,
    "zero_optimization": {**OFFLOAD["zero_optimization"], "offload_param": {"device": "cpu"}},
}


@pytest.mark.parametrize(
    "stage, config",
    [(s, c) for s in (0, 1, 2, 3) for c in (RELEASE_ALL, BF16)]
    + [(3, OFFLOAD), (3, BOTH_OFFLOADS), (2, OFFLOAD)],
    ids=[f"{s}-{n}" for s in (0, 1, 2, 3) for n in ("fp32", "bf16")]
    + ["3-offload", "3-both-offloads", "2-offload"],
)
def test_modifier_rank_writes_its_values_into_every_rank_shard_and_master(stage, config):
    """Rank 1 scales one block and rank 0 changes another: rank 1's values are kept on both
    ranks, rank 0's change is dropped, and parameters nobody touched keep their fp32 master
    bits exactly (a bf16 round trip would not)."""
    torch.manual_seed(0)
    models = [ToyLM(ToySpec(depth=2)) for _ in range(2)]

    def rank(comm):
        model = models[comm.rank]
        state = fzero.shard(model, stage=stage, config=config, process_group=comm)
        ids = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(comm.rank))
        state, _ = fzero.train_step(state, (ids, ids))
        before = fzero.full_state_dict(state)
        with fzero.gathered(state, modifier_rank=1), torch.no_grad():
            if comm.rank == 1:
                model.blocks[1].linear.weight.mul_(2.0)
            else:
                model.blocks[0].linear.weight.zero_()
        return before, fzero.full_state_dict(state)

    (before, after), (_, after1) = run_ranks(2, rank)
    name = "blocks.1.linear.weight"
    dtype = torch.float32 if config is RELEASE_ALL else torch.bfloat16
    expected = (before[name].to(dtype) * 2).float()
    for full in (after, after1):
        assert torch.equal(full[name], expected)
        for other, value in before.items():
            if other != name:
                assert torch.equal(full[other], value), other


def test_gathered_rejects_a_bad_modifier_rank_and_foreign_parameters():
    model = ToyLM(ToySpec())
    state = fzero.shard(model, stage=3, config=RELEASE_ALL)
    with (
        pytest.raises(ShardError, match="modifier_rank must be None or a rank in 0..0"),
        fzero.gathered(state, modifier_rank=1),
    ):
        pass
    with (
        pytest.raises(ShardError, match="not one of this sharded model's parameters"),
        fzero.gathered(state, [torch.nn.Linear(2, 2)]),
    ):
        pass
    with (
        pytest.raises(ShardError, match=r"'embed.weight' was replaced.*copy_"),
        fzero.gathered(state, modifier_rank=0),
    ):
        model.embed.weight.data = torch.zeros(11, 7)
