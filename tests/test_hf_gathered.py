"""Hugging Face models at stage 3 outside a step: released parameters refuse reads with a clear
error, evaluation and ``generate`` gather unit by unit, and inside ``fzero.gathered`` the model
saves, reloads and generates as an unsharded one does. Real ``transformers``, tiny models from
config, no hub access."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fzero
from fzero.errors import ReleasedParameterError

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 50


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config), lambda m: m.transformer.wte


def _llama():
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config), lambda m: m.model.embed_tokens


MODELS = {"gpt2-tied": _gpt2, "llama-gqa": _llama}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_hf_model_at_stage_3_outside_and_inside_gathered(family, tmp_path):
    torch.manual_seed(0)
    model, embedding_of = MODELS[family]()
    model.eval()
    reference = copy.deepcopy(model)
    state = fzero.shard(
        model, stage=3, config={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    )
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    generate = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)

    # Outside a step: reads refuse with the parameter's name, the forward gathers unit by unit.
    embedding = embedding_of(model)
    with pytest.raises(ReleasedParameterError, match="weight.*fzero.gathered"):
        torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ReleasedParameterError, match="weight.*fzero.gathered"):
        model.save_pretrained(tmp_path / "outside")
    with pytest.raises(ReleasedParameterError, match="weight.*fzero.gathered"):
        embedding(ids)
    with pytest.raises(ReleasedParameterError, match="weight.*fzero.gathered"):
        embedding.weight.norm()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    expected = reference.generate(ids, **generate)
    assert torch.equal(model.generate(ids, **generate), expected)

    # Inside gathered: an unsharded model.
    with fzero.gathered(state):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp_path / "inside")
        assert torch.equal(model.generate(ids, **generate), expected)
        assert torch.isfinite(embedding.weight.norm())
    for name, value in reference.state_dict().items():
        assert torch.equal(weights[name], value), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "inside").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, reference(ids).logits, atol=1e-6)

    # Training still works after all of it, and the parameters are released again.
    labels = {"input_ids": ids, "labels": ids}
    state, metrics = fzero.train_step(state, labels)
    assert torch.isfinite(metrics["loss"])
    with pytest.raises(ReleasedParameterError):
        embedding.weight.clone()
