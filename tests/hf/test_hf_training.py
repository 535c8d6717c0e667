"""Hugging Face models (GPT-2 tied, Llama GQA, Qwen2) train like plain PyTorch at every stage,
on one rank and on two gloo ranks, with units from the model's own ``_no_split_modules``."""

from __future__ import annotations

import pytest

import fzero
from tests.hf.common import FAMILIES, assert_same_weights, batches, build, fzero_config
from tests.hf.common import reference_train as reference

STEPS = 3


def _train(family: str, stage: int, rank: int, world_size: int, process_group=None):
    model = build(family)
    state = fzero.shard(model, config=fzero_config(stage), process_group=process_group)
    losses = []
    for step in batches(STEPS, world_size):
        state, metrics = fzero.train_step(state, step[rank])
        losses.append(float(metrics["loss"]))
    return losses, fzero.full_state_dict(state)


def _expected(family: str, world_size: int):
    model = build(family)
    losses = reference(model, batches(STEPS, world_size))
    return losses, model.state_dict()


def test_units_are_the_blocks_the_model_names_in_no_split_modules():
    """GPT-2 names GPT2Block, Llama LlamaDecoderLayer, Qwen2 Qwen2DecoderLayer: one unit each,
    plus the root (embeddings, final norm, head)."""
    expected = {
        "gpt2": ["", "transformer.h.0", "transformer.h.1"],
        "llama": ["", "model.layers.0", "model.layers.1"],
        "qwen2": ["", "model.layers.0", "model.layers.1"],
    }
    for family in FAMILIES:
        model = build(family)
        state = fzero.shard(model, stage=3)
        assert [u.name for u in state.layout.units] == expected[family]
        hinted = set(model._no_split_modules)
        assert all(
            type(model.get_submodule(u.name)).__name__ in hinted for u in state.layout.units[1:]
        )


def test_a_hint_naming_no_module_falls_back_to_the_repeated_blocks():
    model = build("llama")
    model._no_split_modules = ["NoSuchBlock"]
    state = fzero.shard(model, stage=3)
    assert [u.name for u in state.layout.units] == ["", "model.layers.0", "model.layers.1"]


def test_a_hint_chooses_other_units_than_repetition_would():
    """The hint decides: naming the MLPs makes them the units (repetition would take the
    decoder layers)."""
    model = build("llama")
    model._no_split_modules = ["LlamaMLP"]
    state = fzero.shard(model, stage=3)
    assert [u.name for u in state.layout.units] == ["", "model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_every_stage_matches_plain_pytorch(family):
    expected_losses, expected = _expected(family, 1)
    for stage in (0, 1, 2, 3):
        losses, full = _train(family, stage, 0, 1)
        assert losses == pytest.approx(expected_losses, rel=1e-5), stage
        assert_same_weights(full, expected)


# Every stage with the tied model; the others at the stages whose collectives differ most.
GLOO_CASES = (("gpt2", 0), ("gpt2", 1), ("gpt2", 2), ("gpt2", 3), ("llama", 1), ("llama", 3))
GLOO_CASES += (("qwen2", 3),)


def _train_all(rank: int, world_size: int):
    return {case: _train(*case, rank, world_size) for case in GLOO_CASES}


def test_two_gloo_ranks_match_plain_pytorch_on_the_concatenated_batch(hf_pool):
    results = hf_pool.run(_train_all, timeout_s=240)
    for family in FAMILIES:
        expected_losses, expected = _expected(family, 2)
        for stage in [stage for name, stage in GLOO_CASES if name == family]:
            for rank in (0, 1):
                losses, full = results[rank][(family, stage)]
                assert losses == pytest.approx(expected_losses, rel=1e-5), (family, stage)
                assert_same_weights(full, expected)
