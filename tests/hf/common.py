"""Tiny Hugging Face models built from config (no hub access) and the plain PyTorch reference
they are checked against."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

VOCAB = 32
SEQUENCE = 8
LR, WEIGHT_DECAY, EPS, CLIP = 1e-2, 0.1, 1e-2, 0.5  # eps: see tests/harness.py's Case.eps


def config_of(family: str) -> Any:
    """GPT-2 with its head tied to the embedding, Llama with grouped-query attention (4 query
    heads, 2 key/value heads), Qwen2 (GQA, attention biases). No dropout anywhere."""
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
    common = dict(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(family)


FAMILIES = ("gpt2", "llama", "qwen2")


def build(family: str, seed: int = 0, meta: bool = False) -> torch.nn.Module:
    config = config_of(family)
    if meta:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def batches(steps: int, world_size: int, rows: int = 2) -> list[list[dict[str, torch.Tensor]]]:
    """``[step][rank]`` causal-LM batches (labels are the inputs: HF shifts them)."""
    generator = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        row = []
        for _ in range(world_size):
            ids = torch.randint(0, VOCAB, (rows, SEQUENCE), generator=generator)
            row.append({"input_ids": ids, "labels": ids})
        out.append(row)
    return out


def fzero_config(stage: int) -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "eps": EPS},
        },
        "gradient_clipping": CLIP,
    }


def reference_train(model: torch.nn.Module, steps: list) -> list[float]:
    """Plain PyTorch on one device: each step's loss is the mean over every rank's batch (each
    backpropagated in turn, the grouping fzero's ranks make), then clipping and AdamW. Returns
    the losses."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS, foreach=False)
    losses = []
    for step in steps:
        opt.zero_grad()
        total = 0.0
        for batch in step:
            loss = model(**batch).loss / len(step)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        losses.append(total)
    return losses


def assert_same_weights(got: dict, expected: dict, rtol: float = 1e-5) -> None:
    """Every tensor of ``expected`` within ``rtol`` of its largest value (0: exactly)."""
    assert sorted(got) == sorted(expected), set(got) ^ set(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, name
        if rtol == 0:
            assert torch.equal(have.to(want.dtype), want), name
            continue
        scale = want.abs().max().clamp_min(1e-12)
        error = ((have.double() - want.double()).abs().max() / scale).item()
        assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol:.0e}"
