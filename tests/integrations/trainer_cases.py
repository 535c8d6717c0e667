"""Runs of the fzero Trainer and of a plain PyTorch reference on the batches it saw; callable in
the test process or on every rank of a gloo pool (``fn(rank, world_size, ...)``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from tests.integrations.engine_cases import tiny_gpt2

ACCUMULATION, MICRO_BATCH, LENGTH = 2, 2, 8


def auto_config(stage: int, **extra: Any) -> dict[str, Any]:
    """The guide's HF config shape: every batch, clipping and bucket key "auto"."""
    config = {
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
    config.update(extra)
    return config


def dataset(size: int = 32) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 32, (size, LENGTH), generator=generator)
    return [{"input_ids": row, "labels": row} for row in rows]


def arguments(directory: str, stage: int, **overrides: Any):
    from fzero.integrations.transformers import TrainingArguments

    values: dict[str, Any] = dict(
        output_dir=directory,
        fzero=auto_config(stage),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=4,
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def join_for_transformers(rank: int, world_size: int) -> None:
    """accelerate reads the rank from torchrun's variables; the pool joined gloo without them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))


def train(
    rank: int,
    world_size: int,
    directory: str,
    stage: int,
    resume: str | None = None,
    samples: int = 32,
    **overrides: Any,
):
    """Train; returns (logged entries, the input ids of every micro-batch, full parameters)."""
    import fzero
    from fzero.integrations.transformers import Trainer

    if world_size > 1:
        join_for_transformers(rank, world_size)
    seen: list[torch.Tensor] = []

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(inputs["input_ids"].clone())
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = RecordingTrainer(
        model=tiny_gpt2(dropout=0.0),
        args=arguments(directory, stage, **overrides),
        train_dataset=dataset(samples),
    )
    trainer.train(resume_from_checkpoint=resume)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, seen, fzero.full_state_dict(trainer.engine.state), trainer


def train_summary(rank: int, world_size: int, directory: str, stage: int, **overrides):
    """``train`` without the Trainer object (what a pool rank sends back)."""
    logs, seen, full, _ = train(rank, world_size, directory, stage, **overrides)
    return logs, seen, full


def reference(ranks_seen: list[list[torch.Tensor]], windows: list[int] | None = None):
    """Plain PyTorch on one device: each step's loss is the mean over every rank's micro-batches
    of the window (``windows``: micro-batches per step), then clip, AdamW (HF's decay groups)
    and HF's linear schedule. Returns the losses, learning rates and final weights."""
    import transformers
    from torch import nn

    model = tiny_gpt2(dropout=0.0)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    windows = windows or [ACCUMULATION] * 4
    schedule = transformers.get_scheduler(
        "linear", optimizer, num_warmup_steps=2, num_training_steps=len(windows)
    )
    losses, rates, start = [], [], 0
    for size in windows:
        window = [seen[start + i] for seen in ranks_seen for i in range(size)]
        start += size
        optimizer.zero_grad()
        # transformers' rule: the summed token losses over the window's label count (for GPT-2
        # it counts the unshifted labels, while the loss sums the shifted ones).
        items = sum(ids.numel() for ids in window)
        loss = sum(model(ids, labels=ids).loss * ids[:, 1:].numel() for ids in window) / items
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses, rates, dict(model.state_dict())
