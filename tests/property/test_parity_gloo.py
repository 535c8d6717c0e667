"""The same parity as the thread tests, on real gloo process groups (world sizes 2 and 3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from tests.gloo_pool import GlooPool
from tests.harness import (
    Case,
    assert_close_to_reference,
    ordered_reference,
    reference,
    train_rank,
)
from tests.models import ToySpec
from tests.strategies import cases


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"world{n}")
def pool(request):
    pool = GlooPool(request.param)
    yield pool
    pool.close()


def _train(rank: int, world_size: int, case: Case):
    from fzero.collectives import make_communicator

    full, _, metrics = train_rank(case, make_communicator(None))
    return full, [float(m["loss"]) for m in metrics]


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases(world_sizes=(0,)))
def test_gloo_ranks_match_single_device_reference(pool, case):
    """fzero over torch.distributed (gloo) matches the single-device reference, every stage."""
    case = Case(
        case.spec, pool.world_size, case.stage, case.micro, clip=case.clip, no_decay=case.no_decay
    )
    ref = reference(case)
    results = pool.run(_train, case)
    for full, _ in results:
        assert_close_to_reference(full, ref, rtol=1e-5)
    assert len({tuple(losses) for _, losses in results}) == 1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gloo_deterministic_mode_is_bitwise_equal_to_the_ordered_reference(pool, stage):
    """Deterministic mode over gloo (its all-to-all and all-gather) is bit for bit the ordered
    single-device reference, as on thread ranks (one intra-op thread in both: the workers'
    setting, and the order of torch's own CPU reductions depends on it)."""
    torch.set_num_threads(1)
    case = Case(
        ToySpec(depth=3, width=7, frozen=True),
        pool.world_size,
        stage,
        micro=2,
        clip=0.05,
        no_decay=("*.bias",),
        deterministic=True,
    )
    ref = ordered_reference(case)
    for full, _ in pool.run(_train, case):
        for name, expected in ref.items():
            assert torch.equal(full[name], expected), name


def test_a_rank_that_fails_is_reported(pool):
    with pytest.raises(RuntimeError, match="planted"):
        pool.run(_boom)


def _boom(rank: int, world_size: int):
    raise ValueError("planted")
