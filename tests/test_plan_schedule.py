"""``fzero.plan_schedule``: the schedule ``shard`` would run, compiled without allocating.

For a plain stack of blocks it equals, op for op and unit for unit, the schedule the runtime
compiles from the first step's trace: at every stage, on one and two ranks, with optimizer
offload (whole and partial), with fzero's own activation checkpointing and with torch's
``checkpoint_wrapper`` (whose recomputes only the trace shows). A model on the meta device far
larger than this machine plans, verifies and simulates, holding no more than a few MiB.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import fzero
from fzero.collectives import run_ranks
from fzero.errors import ShardError
from fzero.schedule import simulate, verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from gpt import GPT, GPTConfig, MarkovCorpus  # noqa: E402

CFG = GPTConfig(n_layer=3, n_embd=32, n_head=2, vocab_size=64, block_size=16)
OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "stage3_param_persistence_threshold": 0}


def _gpt(meta: bool, wrapped: bool, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        model = GPT(cfg)
    if wrapped:
        for index in range(len(model.h)):
            model.h[index] = checkpoint_wrapper(model.h[index])
    return model


def _config(extra: dict) -> dict:
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "gradient_clipping": 1.0,
        "gradient_accumulation_steps": 1,
        **extra,
    }


def _traced(stage: int, config: dict, wrapped: bool, comm=None):
    state = fzero.shard(_gpt(False, wrapped), stage=stage, config=config, process_group=comm)
    batch = MarkovCorpus(CFG.vocab_size).batch(2, CFG.block_size, torch.Generator().manual_seed(1))
    state, _ = fzero.train_step(state, batch)
    return state.schedule


CASES = [
    (0, {}, False),
    (1, {}, False),
    (2, {}, False),
    (3, {}, False),
    (3, {}, True),
    (3, {"activation_checkpointing": {"number_checkpoints": 2}}, False),
    (2, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, False),
    (3, {"zero_optimization": OFFLOAD}, True),
    (
        3,
        {"zero_optimization": {**OFFLOAD, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
        False,
    ),
    (3, {"zero_optimization": {**OFFLOAD, "offload_param": {"device": "cpu"}}}, False),
]


@pytest.mark.parametrize("stage, extra, wrapped", CASES)
def test_the_plan_is_the_schedule_the_first_step_compiles(stage, extra, wrapped):
    config = _config(extra)
    traced = _traced(stage, config, wrapped)
    assert traced.traced
    planned = fzero.plan_schedule(_gpt(True, wrapped), stage, config)
    assert planned == traced
    assert str(planned) == str(traced)


@pytest.mark.parametrize("stage", [2, 3])
def test_the_plan_for_two_ranks_is_each_ranks_schedule(stage):
    config = _config({"zero_optimization": OFFLOAD} if stage == 3 else {})
    schedules = run_ranks(2, lambda comm: _traced(stage, config, False, comm))
    planned = fzero.plan_schedule(_gpt(True, False), stage, config, world_size=2)
    assert planned == schedules[0] == schedules[1]


def test_a_model_larger_than_this_machine_plans_verifies_and_simulates():
    """A 3.9B GPT on the meta device (63 GB of fp32 master and moments if it were sharded):
    planned under optimizer and parameter offload with every block checkpointed, the schedule
    verifies, simulates one step and names the host copies, while this process's peak resident
    set grows by under 256 MiB."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = GPTConfig(
        n_layer=32, n_embd=3072, n_head=24, vocab_size=50304, block_size=2048, tie_weights=False
    )
    model = _gpt(True, True, big)
    assert sum(p.numel() for p in model.parameters()) > 3.9e9
    config = _config(
        {
            "bf16": {"enabled": True},
            "zero_optimization": {**OFFLOAD, "offload_param": {"device": "cpu"}},
        }
    )
    schedule = fzero.plan_schedule(model, 3, config)
    verify(schedule)
    timeline = simulate(schedule)
    assert timeline.step_seconds > 0
    text = str(schedule)
    for op in ("UploadShard", "CopyGradToHost", "ApplyPendingUpdate", "pre_recompute"):
        assert op in text, op
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024, grown_kib


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True])
def test_a_bad_world_size_is_refused(world_size):
    with pytest.raises(ShardError, match="world_size must be a positive int"):
        fzero.plan_schedule(_gpt(True, False), 3, _config({}), world_size=world_size)
