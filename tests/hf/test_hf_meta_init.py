"""A model built on the meta device is initialised unit by unit into the shards, by the rule
``fzero/state/materialize.py`` documents: the same on every rank, and the same as one device
following the rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fzero
from fzero.errors import ShardError
from tests.hf.common import FAMILIES, assert_same_weights, build, fzero_config


def rule_reference(model: nn.Module, unit_names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The documented rule, written out on an ordinary model: rank 0's draw after
    ``torch.manual_seed(seed)``; unit u under ``manual_seed(base + u)``; its modules in
    post-order, each by ``model._init_weights`` (HF) or ``reset_parameters``."""
    torch.manual_seed(seed)
    base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    order: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        order.append((prefix, module))

    visit("", model)

    def unit_of(name: str) -> int:
        for index, unit in enumerate(unit_names):
            if unit and (name == unit or name.startswith(unit + ".")):
                return index
        return 0

    with torch.no_grad():
        for index in range(len(unit_names)):
            torch.manual_seed(base + index)
            for name, module in order:
                if unit_of(name) != index:
                    continue
                if hasattr(model, "_init_weights"):
                    model._init_weights(module)
                elif any(True for _ in module.parameters(recurse=False)) or any(
                    True for _ in module.buffers(recurse=False)
                ):
                    module.reset_parameters()
    return model.state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_equals_the_rule_on_one_device(family):
    # Stage 3 both with its units released (initialised in the reused buffer) and persistent.
    for stage, config in ((0, None), (3, fzero_config(3)), (3, None)):
        torch.manual_seed(7)
        state = fzero.shard(build(family, meta=True), stage=stage, config=config)
        names = [u.name for u in state.layout.units]
        expected = rule_reference(build(family), names, seed=7)
        assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)


def test_meta_gpt2_gets_hugging_faces_own_initialisation():
    """Parents are initialised after their children: GPT-2's residual projections get the
    scaled std 0.02 / sqrt(2 * n_layer) = 0.01, norms are ones, the tie holds."""
    torch.manual_seed(0)
    model = build("gpt2", meta=True)
    full = fzero.full_state_dict(fzero.shard(model, stage=3))
    assert full["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert full["transformer.h.0.attn.c_proj.weight"].std().item() == pytest.approx(0.01, rel=0.15)
    assert torch.equal(full["transformer.h.1.ln_2.weight"], torch.ones(16))
    assert torch.equal(full["lm_head.weight"], full["transformer.wte.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight


def test_meta_llama_gets_its_rotary_table_and_trains():
    model = build("llama", meta=True)
    state = fzero.shard(model, stage=3)
    reference = build("llama")
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 32, (2, 8))
    state, metrics = fzero.train_step(state, {"input_ids": ids, "labels": ids})
    assert torch.isfinite(metrics["loss"])


def test_accelerate_init_empty_weights_model_equals_the_rule():
    """``init_empty_weights`` puts parameters on the meta device and builds buffers for real."""
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = build("qwen2", meta=False)
    assert model.model.embed_tokens.weight.is_meta
    torch.manual_seed(2)
    state = fzero.shard(model, config=fzero_config(3))
    expected = rule_reference(build("qwen2"), [u.name for u in state.layout.units], seed=2)
    assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)) for _ in range(2)]
        )
        self.norm = nn.BatchNorm1d(6)  # buffers, which reset_parameters sets

    def forward(self, ids):
        return self.norm(self.blocks(self.embed(ids)).mean(1)).square().mean()


def test_meta_plain_module_uses_reset_parameters():
    torch.manual_seed(3)
    with torch.device("meta"):
        model = _Plain()
    state = fzero.shard(model, stage=3)
    names = [u.name for u in state.layout.units]
    assert names == ["", "blocks.0", "blocks.1"]
    expected = rule_reference(_Plain(), names, seed=3)
    assert_same_weights(fzero.full_state_dict(state), expected, rtol=0)


class _NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * self.scale).sum()


class _BufferUnset(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.register_buffer("table", torch.ones(4))


def test_meta_module_that_cannot_be_initialised_is_named():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), _NoReset())
    with pytest.raises(ShardError, match=r"module 1 \(_NoReset\).*reset_parameters"):
        fzero.shard(model, stage=3)
    with torch.device("meta"):
        model = nn.Sequential(_BufferUnset(), nn.Linear(4, 4))
    with pytest.raises(ShardError, match=r"buffer 0\.table .* does not set it"):
        fzero.shard(model, stage=3)


def test_device_is_only_for_meta_models():
    with pytest.raises(ShardError, match="meta device"):
        fzero.shard(nn.Linear(2, 2), stage=3, device="meta")


def _meta_on_ranks(rank: int, world_size: int, family: str, stage: int):
    torch.manual_seed(11 + rank)  # the ranks' generators differ: rank 0's draw decides
    state = fzero.shard(build(family, meta=True), config=fzero_config(stage))
    return [u.name for u in state.layout.units], fzero.full_state_dict(state)


def test_two_gloo_ranks_initialise_alike_without_a_full_copy(hf_pool):
    for family, stage in (("gpt2", 3), ("llama", 1)):
        (names, rank0), (_, rank1) = hf_pool.run(_meta_on_ranks, family, stage)
        expected = rule_reference(build(family), names, seed=11)
        assert_same_weights(rank0, expected, rtol=0)
        assert_same_weights(rank1, expected, rtol=0)
