"""Training runs the engine tests compare, callable in the test process (world size 1) or on
every rank of a gloo pool (``fn(rank, world_size, ...)``)."""

from __future__ import annotations

from typing import Any

import torch


def tiny_gpt2(seed: int = 0, dropout: float = 0.1):
    """A two-block GPT-2 from its config; seeding here makes runs draw the same dropout masks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def engine_config(stage: int, world_size: int, accumulation: int = 2, **extra: Any) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": 2 * accumulation * world_size,
        "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}},
        "zero_optimization": {"stage": stage},
    }
    config.update(extra)
    return config


def micro_batches(rank: int, steps: int, accumulation: int) -> list[list[torch.Tensor]]:
    """Each rank's own token ids, ``accumulation`` micro-batches of 2 sequences per step."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        [torch.randint(0, 32, (2, 8), generator=generator) for _ in range(accumulation)]
        for _ in range(steps)
    ]


def run_engine(engine, batches) -> list[float]:
    """The guide's loop: forward, backward, step for every micro-batch."""
    losses = []
    for window in batches:
        for ids in window:
            outputs = engine(ids, labels=ids)
            engine.backward(outputs.loss)
            engine.step()
        losses.append(float(engine.metrics["loss"]))
    return losses


def engine_equals_train_step(rank: int, world_size: int, stage: int, steps: int = 3):
    """Losses and final parameters of the engine loop and of train_step on the same data."""
    import fzero

    config = engine_config(stage, world_size)
    batches = micro_batches(rank, steps, 2)
    engine, optimizer, _, scheduler = fzero.initialize(model=tiny_gpt2(), config=config)
    engine_losses = run_engine(engine, batches)
    state = fzero.shard(tiny_gpt2(), config=config)
    step_losses = []
    for window in batches:
        state, metrics = fzero.train_step(state, [{"input_ids": x, "labels": x} for x in window])
        step_losses.append(float(metrics["loss"]))
    ours, theirs = fzero.full_state_dict(engine.state), fzero.full_state_dict(state)
    same = all(torch.equal(ours[name], theirs[name]) for name in theirs)
    counters = (engine.global_steps, engine.micro_steps, engine.global_samples)
    return (
        engine_losses,
        step_losses,
        same,
        counters,
        scheduler.get_last_lr(),
        optimizer.param_groups[0]["lr"],
    )


def resume_is_bitwise(rank: int, world_size: int, stage: int, directory: str):
    """Four steps straight, against two steps, save, a fresh engine loading, two more steps."""
    import fzero

    config = engine_config(stage, world_size)
    batches = micro_batches(rank, 4, 2)
    straight, _, _, _ = fzero.initialize(model=tiny_gpt2(), config=config)
    straight_losses = run_engine(straight, batches)
    first, _, _, _ = fzero.initialize(model=tiny_gpt2(), config=config)
    run_engine(first, batches[:2])
    first.save_checkpoint(directory, client_state={"epoch": 7})
    resumed, _, _, _ = fzero.initialize(model=tiny_gpt2(seed=5), config=config)
    path, client_state = resumed.load_checkpoint(directory)
    resumed_losses = run_engine(resumed, batches[2:])
    ours, theirs = fzero.full_state_dict(resumed.state), fzero.full_state_dict(straight.state)
    same = all(torch.equal(ours[name], theirs[name]) for name in theirs)
    counters = (resumed.global_steps, resumed.micro_steps, resumed.global_samples)
    return straight_losses[2:], resumed_losses, same, client_state, counters, str(path)
