"""The DeepSpeed guide's standalone loop with ``deepspeed`` replaced by ``fzero``.

    fzero --num_gpus=4 examples/standalone.py                  # or --num_procs 2 on CPU
    torchrun --nproc-per-node 2 examples/standalone.py
    accelerate launch --multi_gpu --num_processes 2 examples/standalone.py

A tiny GPT-2 (from a config, no download) learns to count; rank 0 prints the loss of every
optimizer step and, last, a ``RESULT`` line the tests read.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fzero


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the launchers
    parser = fzero.add_config_arguments(parser)
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    )

    ds_config = {
        "train_batch_size": 4 * 2 * world_size,  # the guide's 32 on its 4 GPUs
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 3e-3,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": 0.01,
            },
        },
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": args.stage},
    }

    model_engine, optimizer, _, _ = fzero.initialize(
        model=model,
        config=fzero.integrations.config_path_from_args(args) or ds_config,
    )

    # Counting modulo 64 from a random start: each rank draws its own sequences.
    generator = torch.Generator().manual_seed(1 + model_engine.global_rank)
    starts = torch.randint(0, 64, (args.steps * 2 * 4, 1), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in (starts + torch.arange(16)) % 64]
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=4)

    losses = []
    for batch in dataloader:
        inputs = batch["input_ids"].to(model_engine.local_rank)
        labels = batch["labels"].to(model_engine.local_rank)

        outputs = model_engine(inputs, labels=labels)
        loss = outputs.loss

        model_engine.backward(loss)
        model_engine.step()

        if model_engine.global_steps > len(losses):  # an optimizer step ran
            losses.append(float(model_engine.metrics["loss"]))
    if model_engine.global_rank == 0:
        for step, value in enumerate(losses, start=1):
            print(f"step {step} loss {value:.6f}")
        print(f"RESULT world_size={model_engine.world_size} losses={losses}")


if __name__ == "__main__":
    main()
