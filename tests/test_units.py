"""Which modules become units, where tied parameters go, and what that means for stage 3."""

from __future__ import annotations

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.errors import BatchError, ShardError
from fzero.schedule.ops import Trigger
from tests.harness import Case, assert_close_to_reference, reference, train_rank, train_threads
from tests.models import ToyLM, ToySpec

UNTIED = ToySpec(vocab=7, width=6, depth=2, tied=False, shared_block_weight=False, frozen=False)
TIED = ToySpec(vocab=7, width=6, depth=2, tied=True, shared_block_weight=False, frozen=False)


def _unit_names(state) -> list[str]:
    return [u.name for u in state.layout.units]


def _owner(state, name: str) -> str:
    return next(u.name for u in state.layout.units for s in u.params if name in s.names)


EMBEDDING_UNITS = {"fzero": {"embedding_units": True}}


def test_default_units_are_the_repeated_blocks_and_the_root():
    state = fzero.shard(ToyLM(UNTIED), stage=3)
    assert _unit_names(state) == ["", "blocks.0", "blocks.1"]
    assert _owner(state, "embed.weight") == ""


def test_embedding_units_make_each_embedding_a_unit():
    state = fzero.shard(ToyLM(UNTIED), stage=3, config=EMBEDDING_UNITS)
    assert _unit_names(state) == ["", "embed", "blocks.0", "blocks.1"]
    assert _owner(state, "embed.weight") == "embed"
    assert _owner(state, "head.weight") == ""


def test_an_embedding_tied_to_the_head_stays_in_the_root():
    """The head (a root module) reads the tied weight after the embedding's forward: were it the
    embedding unit's, stage 3 would have released it by then."""
    state = fzero.shard(ToyLM(TIED), stage=3, config=EMBEDDING_UNITS)
    assert _unit_names(state) == ["", "blocks.0", "blocks.1"]  # the embedding has nothing left
    assert _owner(state, "embed.weight") == ""
    # Named by the user, the same rule holds.
    state = fzero.shard(ToyLM(TIED), stage=3, units=["embed", "blocks.0"])
    assert _owner(state, "embed.weight") == ""
    assert _owner(state, "blocks.1.linear.weight") == ""


def test_user_units_with_a_tie_to_the_root_train_like_the_reference():
    case = Case(spec=TIED, world_size=1, stage=3, micro=1)
    model = ToyLM(TIED)
    state = fzero.shard(model, stage=3, config=case.config(), units=["embed", "blocks.0"])
    for step in range(case.steps):
        state, _ = fzero.train_step(state, case.batches()[step][0][0])
    assert_close_to_reference(fzero.full_state_dict(state), reference(case))


def test_stage3_releases_the_embedding_before_the_loss():
    """At the root's post-forward (the loss, where activations peak) only the root unit is
    gathered: the embedding went right after its own forward."""
    case = Case(
        spec=UNTIED,
        world_size=1,
        stage=3,
        micro=1,
        embedding_units=True,
        extra={"zero_optimization": {"stage3_max_reuse_distance": 0}},
    )
    _, state, _ = train_rank(case, None, record=True)
    executor = state.runtime.executor
    root = next(u for u in executor.schedule.units if u.is_root)
    embed = next(u for u in executor.schedule.units if u.name == "embed")
    assert embed.param_nbytes > 0  # so the root's bytes below leave the embedding out
    at_loss = [p for trigger, p, _ in executor.live_log if trigger == Trigger("post_forward", 0)]
    assert at_loss and all(p == root.param_nbytes for p in at_loss), at_loss


def test_stage3_does_not_gather_an_embedding_for_its_backward():
    """An embedding's backward reads only the indices: no AllGather of it after the forward,
    and training still matches the reference on several ranks."""
    from fzero.schedule import verify
    from fzero.schedule.ops import AllGather

    case = Case(spec=UNTIED, world_size=2, stage=3, micro=2, embedding_units=True)
    results = train_threads(case)
    state = results[0][1]
    schedule = state.schedule
    verify(schedule)
    embed = next(u.index for u in schedule.units if u.name == "embed")
    assert not next(u for u in schedule.units if u.index == embed).backward_reads_params
    backward = [e for e in schedule.micro_step if e.trigger.kind.endswith("backward")]
    assert not [
        op for e in backward for op in e.ops if isinstance(op, AllGather) and op.unit == embed
    ]
    for full, _, _ in results:
        assert_close_to_reference(full, reference(case))


def test_embedding_units_and_explicit_units_are_not_combined():
    with pytest.raises(ShardError, match="embedding_units"):
        fzero.shard(ToyLM(UNTIED), stage=3, config=EMBEDDING_UNITS, units=["embed"])


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("spec", [UNTIED, TIED], ids=["untied", "tied"])
def test_embedding_units_with_gradients_reduced_once_per_step(stage, spec):
    """Embedding units (not gathered for backward in stage 3) with every unit's gradient kept
    across three micro-batches and reduced once: still the reference's training."""
    case = Case(spec=spec, world_size=2, stage=stage, micro=3, embedding_units=True)
    config = case.config()
    config["fzero"]["reduce_every_micro_batch"] = False
    models = [ToyLM(spec) for _ in range(2)]
    batches = case.batches()

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=stage, config=config, process_group=comm)
        for step in range(case.steps):
            state, _ = fzero.train_step(state, batches[step][comm.rank])
        return fzero.full_state_dict(state)

    for full in run_ranks(2, rank):
        assert_close_to_reference(full, reference(case))


class _HeadReadsTheEmbeddingTable(torch.nn.Module):
    """An output head that computes with the embedding's weight directly, not through a
    module: the embedding unit has released it by then."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(11, 8)
        self.h = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, ids, targets):
        x = self.wte(ids)
        for block in self.h:
            x = x + torch.tanh(block(x))
        logits = torch.nn.functional.linear(x, self.wte.weight)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))


def test_a_parameter_read_outside_its_unit_gets_an_error_that_says_so():
    ids = torch.randint(11, (2, 5))
    config = {**EMBEDDING_UNITS, "zero_optimization": {"stage3_param_persistence_threshold": 0}}
    state = fzero.shard(_HeadReadsTheEmbeddingTable(), stage=3, config=config)
    with pytest.raises(BatchError, match="read while released.*units="):
        fzero.train_step(state, (ids, ids))
    # With the default units the table is the root's, gathered for the whole step.
    state = fzero.shard(_HeadReadsTheEmbeddingTable(), stage=3)
    state, metrics = fzero.train_step(state, (ids, ids))
    assert torch.isfinite(metrics["loss"])
