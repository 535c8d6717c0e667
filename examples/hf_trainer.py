"""The DeepSpeed guide's Hugging Face Trainer script, on fzero: only the import changes.

    fzero --num_gpus=4 examples/hf_trainer.py --deepspeed examples/ds_config_hf.json \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 4
    torchrun --nproc-per-node 2 examples/hf_trainer.py --fzero examples/ds_config_hf.json
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py --max_steps 8

The config is the guide's (ZeRO-3, bf16, "auto" values filled from the arguments). The model is
a tiny Llama built from its config (no download) learning to count modulo its vocabulary; on a
machine without a GPU the script trains on the CPU (``--use_cpu``, gloo between processes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from fzero.integrations.transformers import Trainer, TrainingArguments

VOCABULARY, LENGTH = 64, 32


def counting_dataset(size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCABULARY, (size, 1), generator=generator)
    rows = (starts + torch.arange(LENGTH)) % VOCABULARY
    return [{"input_ids": row, "labels": row} for row in rows]


def main() -> None:
    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(  # the guide's arguments
        output_dir="./output",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        num_train_epochs=3,
        learning_rate=3e-3,  # not the guide's: a tiny model learns faster than the default 5e-5
        bf16=True,
        deepspeed=str(Path(__file__).with_name("ds_config_hf.json")),  # read as fzero=
        gradient_checkpointing=True,
        logging_steps=10,
        save_strategy="steps",
        save_steps=500,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
    )
    (training_args,) = parser.parse_args_into_dataclasses()

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCABULARY,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=LENGTH,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    train_dataset = counting_dataset(256)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
    )

    trainer.train()
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(f"RESULT steps={trainer.state.global_step} losses={losses}")


if __name__ == "__main__":
    main()
