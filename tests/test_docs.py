"""docs/schedule.md shows a printed schedule: it must be what fzero prints today."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import fzero
from fzero.collectives import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def test_the_schedule_in_docs_is_what_fzero_prints():
    sys.path.insert(0, str(ROOT / "examples"))
    from gpt import GPT, GPTConfig

    text = (ROOT / "docs" / "schedule.md").read_text()
    start = text.index("```\nSchedule:") + len("```\n")
    documented = text[start : text.index("```", start)].rstrip("\n")
    # As the page says: a 2-block GPT, n_embd 64, stage 3 on 2 ranks in bf16, each block
    # released after its forward and gathered one block ahead, one train_step.
    torch.manual_seed(0)
    models = [GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32, n_head=4)) for _ in range(2)]
    config = {
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_param_persistence_threshold": 0,
        },
    }
    ids = torch.randint(64, (2, 32))

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=3, config=config, process_group=comm)
        state, _ = fzero.train_step(state, (ids, ids))
        return str(state.schedule)

    assert run_ranks(2, rank)[0] == documented


def test_the_recompute_excerpt_in_docs_is_what_fzero_prints():
    """The page's activation-checkpointing excerpt: the same GPT, fzero checkpointing both
    blocks."""
    sys.path.insert(0, str(ROOT / "examples"))
    from gpt import GPT, GPTConfig

    text = (ROOT / "docs" / "schedule.md").read_text()
    start = text.index("```\n-- backward") + len("```\n")
    documented = text[start : text.index("```", start)].rstrip("\n")
    torch.manual_seed(0)
    models = [GPT(GPTConfig(n_layer=2, n_embd=64, block_size=32, n_head=4)) for _ in range(2)]
    config = {
        "bf16": {"enabled": True},
        "activation_checkpointing": {"number_checkpoints": 2},
        "zero_optimization": {
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_param_persistence_threshold": 0,
        },
    }
    ids = torch.randint(64, (2, 32))

    def rank(comm):
        state = fzero.shard(models[comm.rank], stage=3, config=config, process_group=comm)
        state, _ = fzero.train_step(state, (ids, ids))
        return str(state.schedule)

    printed = run_ranks(2, rank)[0]
    assert "pre_recompute" in documented
    assert documented in printed
