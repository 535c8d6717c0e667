"""Ranks that disagree (model, config) fail at shard time on every rank, naming the
difference, instead of hanging in a later collective."""

from __future__ import annotations

import pytest

from fzero.collectives import run_ranks
from fzero.errors import ScheduleMismatchError
from tests.gloo_pool import GlooPool
from tests.models import ToyLM, ToySpec


def _shard_with(rank: int, world_size: int, width_on_rank1: int, bucket_on_rank1: int):
    import fzero
    from fzero.errors import ScheduleMismatchError

    spec = ToySpec(depth=2, width=width_on_rank1 if rank == 1 else 5)
    bucket = bucket_on_rank1 if rank == 1 else 1000
    try:
        fzero.shard(
            ToyLM(spec), stage=3, config={"zero_optimization": {"reduce_bucket_size": bucket}}
        )
    except ScheduleMismatchError as error:
        return str(error)
    return "no error"


@pytest.fixture(scope="module")
def pool():
    pool = GlooPool(2)
    yield pool
    pool.close()


def test_different_model_on_one_gloo_rank_fails_on_every_rank(pool):
    messages = pool.run(_shard_with, 7, 1000, timeout_s=60)
    for message in messages:
        assert "rank 0 and rank 1 differ" in message
        assert "units.<root>.embed.weight.shape[1] (5 vs 7)" in message


def test_different_config_on_one_gloo_rank_names_the_key(pool):
    messages = pool.run(_shard_with, 5, 2000, timeout_s=60)
    for message in messages:
        assert "config.zero_optimization.reduce_bucket_size" in message
        assert "1000" in message and "2000" in message


def test_thread_ranks_disagreeing_on_stage_fail_together():
    def body(comm):
        import fzero

        return fzero.shard(
            ToyLM(ToySpec(depth=2, width=5)), stage=2 + comm.rank, process_group=comm
        )

    with pytest.raises(ScheduleMismatchError, match="zero_optimization.stage"):
        run_ranks(2, body)
