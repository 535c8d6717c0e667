"""``fzero.load_pretrained`` fills the shards from a folder ``save_pretrained`` wrote: the same
weights as the saved model, at every stage and world size, single file or sharded, reading only
this rank's byte ranges (its host peak stays near its shard plus one tensor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fzero
from fzero.errors import CheckpointMismatchError
from tests.hf.common import assert_same_weights, build, config_of, fzero_config, transformers

CHILD = Path(__file__).with_name("memory_child.py")


def _saved(tmp_path: Path, family: str, max_shard_size: str | None = None, dtype=None) -> Path:
    model = build(family, seed=5)
    if dtype is not None:
        model = model.to(dtype)
    folder = tmp_path / f"{family}-{max_shard_size}-{dtype}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_stage_loads_the_saved_weights_exactly(tmp_path, family):
    expected = build(family, seed=5).state_dict()
    single, sharded = _saved(tmp_path, family), _saved(tmp_path, family, "20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    for stage in (0, 1, 2, 3):
        for folder in (single, sharded):
            config = fzero_config(stage)  # stage 3: units released between uses
            state = fzero.load_pretrained(folder, build(family, meta=True), config)
            assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)


def test_a_bf16_checkpoint_is_converted_and_a_live_state_refilled(tmp_path):
    folder = _saved(tmp_path, "qwen2", dtype=torch.bfloat16)
    expected = {
        k: v.float() for k, v in build("qwen2", seed=5).to(torch.bfloat16).state_dict().items()
    }
    state = fzero.shard(build("qwen2", seed=99), stage=2)
    state = fzero.load_pretrained(folder, state)
    assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)
    ids = torch.randint(0, 32, (2, 8))
    reference = build("qwen2", seed=5).to(torch.bfloat16).float()
    with torch.no_grad():  # the model computes with what was loaded (up to summation order)
        got, want = state.model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_base_model_prefixes_are_matched_both_ways(tmp_path):
    """A GPT2Model loads a GPT2LMHeadModel folder (keys ``transformer.*``; the tied head is not
    stored) and the head model loads a base model's folder (keys without the prefix)."""
    head = build("gpt2", seed=5)
    base = transformers.GPT2Model(config_of("gpt2"))
    state = fzero.load_pretrained(_saved(tmp_path, "gpt2"), base, stage=3)
    expected = {k.removeprefix("transformer."): v for k, v in head.state_dict().items()}
    del expected["lm_head.weight"]
    assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)
    head.transformer.save_pretrained(tmp_path / "base")
    state = fzero.load_pretrained(tmp_path / "base", build("gpt2", meta=True), stage=1)
    assert_same_weights(fzero.full_state_dict(state), head.state_dict(), rtol=0)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    folder = _saved(tmp_path, "llama")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        fzero.load_pretrained(folder, build("llama", meta=True), stage=3)
    assert "'model.layers.1.mlp.up_proj.weight'" in str(error.value)
    assert "'model.layers.9.extra.weight'" in str(error.value)
    # strict=False loads what matches; the missing one keeps its initial values.
    state = fzero.load_pretrained(folder, build("llama", meta=True), stage=3, strict=False)
    full, expected = fzero.full_state_dict(state), build("llama", seed=5).state_dict()
    assert torch.equal(
        full["model.layers.0.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        full["model.layers.1.mlp.up_proj.weight"], expected["model.layers.1.mlp.up_proj.weight"]
    )


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    folder = _saved(tmp_path, "gpt2")
    config = config_of("gpt2")
    config.n_embd = 32
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(
        CheckpointMismatchError, match=r"'transformer.wte.weight' has shape \[32, 16\]"
    ):
        fzero.load_pretrained(folder, model, stage=3)


def _load_on_ranks(rank: int, world_size: int, folder: str, stage: int):
    state = fzero.load_pretrained(folder, build("llama", meta=True), fzero_config(stage))
    return fzero.full_state_dict(state)


def test_two_gloo_ranks_each_load_their_slices(hf_pool, tmp_path):
    folder = _saved(tmp_path, "llama", "30KB")
    expected = build("llama", seed=5).state_dict()
    for stage in (1, 3):
        for full in hf_pool.run(_load_on_ranks, str(folder), stage):
            assert_same_weights(full, expected, rtol=0)


def test_host_peak_stays_near_the_shard_for_a_model_several_times_larger(tmp_path):
    """A 64 MiB (fp32) Llama-shaped model loaded as rank 0 of 16: the peak growth of the
    process (meta model to loaded state) stays under a third of the model, near this rank's
    state (master and two moments: 3 x 4 MiB) plus one unit (measured 11.1 MiB after the
    child's warm-up, in two environments; before the warm-up existed, 17-23 MiB depending on
    the environment's first-use costs)."""
    config = transformers.LlamaConfig(
        num_hidden_layers=20,
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model_nbytes = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path / "big", max_shard_size="20MB")
    del model
    result = _child(["load", str(tmp_path / "big"), str(tmp_path / "big"), "16"])
    print(f"model {model_nbytes / 2**20:.1f} MiB, measured {result}")
    assert result["peak"] < model_nbytes / 3
    assert result["peak"] < result["state_nbytes"] + 8 * 2**20  # + a unit, a tensor, overhead


def _child(args: list[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, str(CHILD), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
