"""Hugging Face gradient checkpointing (both ``use_reentrant`` values) under fzero: each layer's
recompute is a ``pre_recompute`` trigger of the schedule, and training matches the same model
trained by plain PyTorch with the same checkpointing. Real ``transformers``, tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import fzero
from fzero.collectives import run_ranks
from fzero.schedule import ops as O
from tests.harness import assert_close_to_reference

transformers = pytest.importorskip("transformers")

VOCAB, LR, EPS, STEPS = 40, 1e-2, 1e-2, 2
CONFIG = {
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "eps": EPS, "weight_decay": 0.0}},
    "zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0},
}


def _model(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _batches(world_size: int):
    g = torch.Generator().manual_seed(3)
    return [
        [{"input_ids": (ids := torch.randint(VOCAB, (2, 6), generator=g)), "labels": ids}
         for _ in range(world_size)]
        for _ in range(STEPS)
    ]  # fmt: skip


def _reference(model, batches):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    for step in batches:
        optimizer.zero_grad()
        for batch in step:
            (model(**batch).loss / len(step)).backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_gradient_checkpointing_at_stage_3_matches_pytorch(family, reentrant):
    base = _model(family)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.train()
    models = [copy.deepcopy(base) for _ in range(2)]
    expected = _reference(copy.deepcopy(base), _batches(2))
    batches = _batches(2)

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=3, config=CONFIG, process_group=comm)
        for step in batches:
            state, _ = fzero.train_step(state, step[comm.rank])
        return fzero.full_state_dict(state), state.schedule

    results = run_ranks(2, rank)
    for full, _ in results:
        assert_close_to_reference(full, {k: v.float() for k, v in expected.items()})
    schedule = results[0][1]
    layers = [u.index for u in schedule.units if u.name != ""]
    recomputed = [e.trigger.unit for e in schedule.micro_step if e.trigger.kind == O.PRE_RECOMPUTE]
    assert sorted(recomputed) == layers
    # Gathered once for forward, once for recompute and backward together.
    gathers = [op.unit for op in schedule.ops(1) if isinstance(op, O.AllGather)]
    assert all(gathers.count(unit) == 2 for unit in layers), gathers
