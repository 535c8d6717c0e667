"""Bad input gets a clear error naming the problem, and leaves the state usable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fzero
from fzero.errors import BatchError, ConfigError, DonatedStateError, LossError, ShardError
from tests.models import ToyLM, ToySpec, make_batches

SPEC = ToySpec(depth=2, width=5)


def _batch(micro: int = 1):
    return make_batches(SPEC, steps=1, world_size=1, micro=micro)[0][0]


@pytest.mark.parametrize("stage", [-1, 4, 7])
def test_stage_outside_0_to_3(stage):
    with pytest.raises(ShardError, match=f"stage must be 0, 1, 2 or 3, got {stage}"):
        fzero.shard(ToyLM(SPEC), stage=stage)


def test_stage_of_wrong_type():
    with pytest.raises(ShardError, match="stage must be an int"):
        fzero.shard(ToyLM(SPEC), stage="3")


def test_stage_in_config_outside_0_to_3():
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        fzero.shard(ToyLM(SPEC), config={"zero_optimization": {"stage": 5}})


def test_model_without_trainable_parameters():
    model = ToyLM(SPEC).requires_grad_(False)
    with pytest.raises(ShardError, match="no trainable parameters"):
        fzero.shard(model, stage=2)


def test_model_without_parameters():
    with pytest.raises(ShardError, match="no parameters"):
        fzero.shard(nn.ReLU(), stage=1)


def test_a_host_model_cannot_be_sharded_onto_the_meta_device():
    """Host to an accelerator is a move fzero makes while sharding; to the meta device it is not
    (the values would be lost). tests/gpu/test_cuda_offload.py shards a host model onto CUDA."""
    with pytest.raises(ShardError, match="device=meta: this model is on cpu"):
        fzero.shard(ToyLM(SPEC), stage=3, device="meta")


def test_unknown_config_key_is_named_with_a_suggestion():
    message = r"zero_optimization\.reduce_bucket_sise.*reduce_bucket_size"
    with pytest.raises(ConfigError, match=message):
        fzero.shard(ToyLM(SPEC), stage=1, config={"zero_optimization": {"reduce_bucket_sise": 10}})


@pytest.mark.parametrize("stage", [0, 3])
def test_batch_the_model_rejects_leaves_state_usable(stage):
    state = fzero.shard(ToyLM(SPEC), stage=stage)
    bad = (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))  # float token ids
    with pytest.raises(BatchError, match="micro-batch 0: the model raised"):
        fzero.train_step(state, bad)
    before = fzero.full_state_dict(state)
    state, metrics = fzero.train_step(state, _batch()[0])  # the same state still trains
    assert torch.isfinite(metrics["loss"])
    assert metrics["step"] == 1
    changed = fzero.full_state_dict(state)
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_micro_batch_count_must_match_gradient_accumulation_steps():
    state = fzero.shard(ToyLM(SPEC), stage=2, config={"gradient_accumulation_steps": 2})
    message = "got 3 micro-batches but gradient_accumulation_steps is 2"
    with pytest.raises(BatchError, match=message):
        fzero.train_step(state, _batch(3))
    state, _ = fzero.train_step(state, _batch(2))


def test_empty_micro_batch_list():
    state = fzero.shard(ToyLM(SPEC), stage=0)
    with pytest.raises(BatchError, match="empty list"):
        fzero.train_step(state, [])


def test_output_without_a_loss():
    state = fzero.shard(ToyLM(SPEC), stage=0, loss_fn=lambda model, batch: {"logits": 1})
    with pytest.raises(LossError, match="cannot find a loss"):
        fzero.train_step(state, _batch()[0])


def test_loss_that_is_not_a_scalar():
    def loss_fn(model, batch):
        return model.embed(batch[0]).sum(-1)

    state = fzero.shard(ToyLM(SPEC), stage=0, loss_fn=loss_fn)
    with pytest.raises(LossError, match="floating-point scalar"):
        fzero.train_step(state, _batch()[0])


def test_loss_from_mapping_and_attribute():
    class Output:
        def __init__(self, loss):
            self.loss = loss

    for wrap in (lambda x: {"loss": x}, Output):
        state = fzero.shard(
            ToyLM(SPEC), stage=1, loss_fn=lambda model, batch, wrap=wrap: wrap(model(*batch))
        )
        state, metrics = fzero.train_step(state, _batch()[0])
        assert torch.isfinite(metrics["loss"])


def test_donated_state_cannot_be_used_again():
    state = fzero.shard(ToyLM(SPEC), stage=3)
    new_state, _ = fzero.train_step(state, _batch()[0])
    with pytest.raises(DonatedStateError, match="donated"):
        fzero.train_step(state, _batch()[0])
    with pytest.raises(DonatedStateError):
        fzero.full_state_dict(state)
    fzero.train_step(new_state, _batch()[0])


def test_model_sharded_twice():
    model = ToyLM(SPEC)
    fzero.shard(model, stage=1)
    with pytest.raises(ShardError, match="already sharded"):
        fzero.shard(model, stage=1)


def test_units_that_are_not_submodules():
    model = ToyLM(SPEC)
    with pytest.raises(ShardError, match="no submodule 'blocks.9'"):
        fzero.shard(model, stage=3, units=["blocks.9"])
    with pytest.raises(ShardError, match="must not nest"):
        fzero.shard(ToyLM(SPEC), stage=3, units=["blocks", "blocks.0"])


def test_model_changing_its_unit_order_gets_a_schedule_error():
    """A model whose forward visits units in another order than traced is stopped with a
    ScheduleError instead of a wrong gather, and the state stays usable."""

    class Shuffled(ToyLM):
        flip = False

        def forward(self, ids, targets):
            if self.flip:
                self.blocks = torch.nn.ModuleList(reversed(list(self.blocks)))
            return super().forward(ids, targets)

    model = Shuffled(SPEC)
    state = fzero.shard(model, stage=3)
    state, _ = fzero.train_step(state, _batch()[0])
    model.flip = True
    with pytest.raises(fzero.errors.ScheduleError, match="execution order differs"):
        fzero.train_step(state, _batch()[0])


def test_eval_forward_outside_train_step_works_in_every_stage():
    for stage in range(4):
        model = ToyLM(SPEC)
        reference = ToyLM(SPEC)
        fzero.shard(model, stage=stage)
        ids, targets = _batch()[0]
        with torch.no_grad():
            assert torch.allclose(model(ids, targets), reference(ids, targets))
