"""fzero.deterministic: N ranks, any stage, match one device summing the same micro-batch
gradients in a fixed order, bit for bit."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Case, ordered_reference, train_threads
from tests.strategies import cases


def assert_bitwise_equal(full: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(full) == list(ref)
    for name, expected in ref.items():
        assert torch.equal(full[name], expected), (
            f"{name}: max difference {(full[name] - expected).abs().max().item():.3e}"
        )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), other_stage=st.sampled_from([0, 1, 2, 3]))
def test_deterministic_mode_is_bitwise_equal_to_the_ordered_reference(case, other_stage):
    """Drawn models (odd widths, tied, shared and frozen parameters), world sizes 1-4, stages
    0-3, 1-3 micro-batches, clipping on or off: after 3 steps every rank's full_state_dict is
    torch.equal to plain PyTorch summing the micro-batch gradients in fzero's fixed order, and so
    is a run at another stage."""
    torch.set_num_threads(1)
    case = dataclasses.replace(case, deterministic=True)
    ref = ordered_reference(case)
    for full, _, _ in train_threads(case):
        assert_bitwise_equal(full, ref)
    other = dataclasses.replace(case, stage=other_stage)
    assert_bitwise_equal(train_threads(other)[0][0], ref)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(world_sizes=(2, 4), steps=2))
def test_deterministic_result_does_not_depend_on_the_world_size(case):
    """N ranks with one micro-batch each equal one rank with those N micro-batches in rank
    order, bit for bit. (N ranks divide the summed gradient by N, one rank divides each
    micro-batch's loss by N: the same only when N is a power of two.)"""
    torch.set_num_threads(1)
    case = dataclasses.replace(case, micro=1, deterministic=True)
    world = case.world_size
    batches = case.batches()
    # One rank, N micro-batches, each the rank-r micro-batch of that step.
    single = dataclasses.replace(case, world_size=1, micro=world)
    flat = [[[step[rank][0] for rank in range(world)]] for step in batches]
    many = train_threads(case)[0][0]
    one = _train_with_batches(single, flat)
    assert_bitwise_equal(many, one)


def _train_with_batches(case: Case, batches) -> dict[str, torch.Tensor]:
    import fzero
    from tests.models import ToyLM

    state = fzero.shard(ToyLM(case.spec), stage=case.stage, config=case.config())
    for step in batches:
        state, _ = fzero.train_step(state, step[0])
    return fzero.full_state_dict(state)
