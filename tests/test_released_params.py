"""Stage 3 releases a unit's parameters between uses; a released parameter is a safe tensor
that refuses reads with an error naming it and the fix, never a segfault or garbage."""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.errors import ReleasedParameterError, RequiresGradChangedError
from fzero.state.released import is_released
from tests.models import ToyLM, ToySpec

RELEASE_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _sharded(stage: int):
    model = ToyLM(ToySpec())
    return model, fzero.shard(model, stage=stage, config=RELEASE_ALL)


READS = {
    "detach": lambda p, m: str(p.detach()),
    "norm": lambda p, m: p.norm(),
    "clone": lambda p, m: p.clone(),
    "numpy": lambda p, m: p.detach().numpy(),
    "data": lambda p, m: p.data + 0,
    "arithmetic": lambda p, m: p * 2,
    "state_dict": lambda p, m: torch.save(m.state_dict(), "/dev/null"),
    "submodule": lambda p, m: m.embed(torch.zeros(1, 2, dtype=torch.long)),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_a_released_parameter_refuses_reads_with_its_name_and_the_fix(read):
    model, state = _sharded(3)
    param = model.embed.weight
    assert is_released(param)
    with pytest.raises(ReleasedParameterError, match=r"'embed\.weight'.*fzero\.gathered"):
        READS[read](param, model)


def test_a_released_parameter_keeps_its_metadata_and_describes_itself():
    model, state = _sharded(3)
    param = model.blocks[0].linear.weight
    assert param.shape == (7, 7) and param.dtype == torch.float32 and param.requires_grad
    assert param.numel() == 49 and param.grad is None and isinstance(param, torch.nn.Parameter)
    assert param in set(model.parameters())
    assert "released parameter 'blocks.0.linear.weight'" in repr(param)
    assert "fzero.gathered" in str(param)


def test_parameters_are_released_again_after_a_step_and_an_evaluation():
    model, state = _sharded(3)
    ids = torch.randint(11, (2, 5))
    state, _ = fzero.train_step(state, (ids, ids))
    assert all(is_released(p) for p in model.parameters())
    with torch.no_grad():
        loss = model(ids, ids)
    assert torch.isfinite(loss)
    assert all(is_released(p) for p in model.parameters())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_below_stage_3_parameters_are_plain_and_readable(stage):
    model, state = _sharded(stage)
    for param in model.parameters():
        assert type(param) is torch.nn.Parameter
        assert torch.isfinite(param.norm())


@pytest.mark.parametrize("trainable_at_shard", [True, False])
def test_requires_grad_changed_on_a_released_parameter_is_caught_at_the_next_step(
    trainable_at_shard,
):
    """The step's requires_grad check reads released parameters' flags past their
    ``__torch_function__``: a flag flipped while the parameter is released raises naming it,
    and set back, the step trains."""
    model = ToyLM(ToySpec())
    param = model.blocks[0].linear.weight
    param.requires_grad_(trainable_at_shard)
    state = fzero.shard(model, stage=3, config=RELEASE_ALL)
    assert is_released(param)
    param.requires_grad_(not trainable_at_shard)
    ids = torch.randint(11, (2, 5))
    with pytest.raises(RequiresGradChangedError, match=r"'blocks\.0\.linear\.weight'"):
        fzero.train_step(state, (ids, ids))
    param.requires_grad_(trainable_at_shard)
    state, metrics = fzero.train_step(state, (ids, ids))
    assert torch.isfinite(metrics["loss"])
    assert all(is_released(p) for p in model.parameters())
