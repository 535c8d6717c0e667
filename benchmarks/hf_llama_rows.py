"""The training rows of benchmarks/hf_llama.py, each run in a child process of its own: fzero and
FSDP2 steps, with and without Hugging Face activation checkpointing, and the Trainer next to a
``train_step`` loop over the same dataloader (the ``load_pretrained`` row: hf_llama_load.py)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import torch
from step import _init_single_process_group, _optimizer_config

GUIDE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "ds_config_hf.json")


@dataclass(frozen=True)
class Sizes:
    """The Llama-shaped model and its batch (defaults: ~1.1B parameters, TinyLlama's shape)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    seq_len: int = 2048
    batch: int = 4


def llama_config(sizes: Sizes):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        vocab_size=sizes.vocab,
        max_position_embeddings=sizes.seq_len,
        attn_implementation="sdpa",
        use_cache=False,
    )


def build_model(sizes: Sizes, device: torch.device | str, checkpointing: bool = False):
    """The model from config, seed 0, in training mode; ``checkpointing``: HF's own activation
    checkpointing of every decoder layer (non-reentrant)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(sizes))
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """What ``TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs=
    {"use_reentrant": False})`` does: every decoder layer recomputed in backward."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def flops_per_token(model, sizes: Sizes) -> float:
    """6 N (weights, forward and backward) + 12 L h s (attention scores), PaLM's formula;
    checkpointing's recompute is not counted (MFU of the model's work, not of the device's)."""
    numel = sum(p.numel() for p in model.parameters())
    return 6 * numel + 12 * sizes.layers * sizes.hidden * sizes.seq_len


def random_rows(sizes: Sizes, count: int) -> torch.Tensor:
    """``count`` rows of random token ids from a fixed seed (the labels are the inputs)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(sizes.vocab, (count, sizes.seq_len), generator=generator)


def make_step(impl: str, sizes: Sizes, device: torch.device):
    """``impl`` is fzero:3, fzero:3+ckpt, fsdp2 or fsdp2+ckpt; returns (model, step(batch) ->
    loss tensor). fzero releases each layer after its forward and prefetches one ahead, as
    FSDP2's defaults do (the settings benchmarks/step.py compares with)."""
    checkpointing = impl.endswith("+ckpt")
    kind, _, stage = impl.removesuffix("+ckpt").partition(":")
    bf16 = device.type == "cuda"
    model = build_model(sizes, device, checkpointing)
    if kind == "fzero":
        import fzero

        config = {
            "optimizer": _optimizer_config(),
            "gradient_clipping": 1.0,
            "bf16": {"enabled": bf16},
            "zero_optimization": {
                "stage": int(stage),
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": 0,
            },
        }
        box = {"state": fzero.shard(model, config=config)}

        def step(batch):
            box["state"], metrics = fzero.train_step(box["state"], batch)
            return metrics["loss"]

        return model, step
    if kind != "fsdp2":
        raise ValueError(f"unknown implementation {impl!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    _init_single_process_group(device)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    for layer in model.modules():
        if isinstance(layer, LlamaDecoderLayer):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=bf16
    )

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_timing(device: torch.device) -> float:
    """Called after the warm-up: the peak from here on is the training peak."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def _timed(impl, sizes, device, model, elapsed: float, steps: int, loss) -> dict:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "impl": impl,
        "tokens_per_s": steps * sizes.batch * sizes.seq_len / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "peak_gib": peak,
        "flops_per_token": flops_per_token(model, sizes),
        "loss": float(loss),
    }


def run_step_row(impl: str, sizes: Sizes, steps: int, warmup: int, device) -> dict:
    """fzero:3, fzero:3+ckpt, fsdp2, fsdp2+ckpt: ``warmup`` steps, then ``steps`` timed."""
    model, step = make_step(impl, sizes, device)
    rows = random_rows(sizes, 4 * sizes.batch).to(device)
    batches = [{"input_ids": ids, "labels": ids} for ids in rows.split(sizes.batch)]
    for index in range(warmup):
        step(batches[index % len(batches)])
    start = _start_timing(device)
    for index in range(steps):
        loss = step(batches[index % len(batches)])
    synchronize(device)
    return _timed(impl, sizes, device, model, time.perf_counter() - start, steps, loss)


def make_trainer(sizes: Sizes, steps: int, warmup: int, device, output_dir: str, callbacks=()):
    """The guide's Trainer script on the Llama: its ds config ("auto" values; bf16 from the
    arguments, so the CPU smoke runs in fp32), stage 3, activation checkpointing, the rows'
    optimizer, a fixed synthetic dataset of exactly the steps' batches, logging and saving off."""
    from fzero.config.parse import load_file
    from fzero.integrations.transformers import Trainer, TrainingArguments

    config = load_file(GUIDE_CONFIG)
    config["bf16"] = {"enabled": "auto"}
    cuda = device.type == "cuda"
    arguments = TrainingArguments(
        output_dir=output_dir,
        fzero=config,
        per_device_train_batch_size=sizes.batch,
        gradient_accumulation_steps=1,
        max_steps=warmup + steps,
        learning_rate=3e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        bf16=cuda,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        seed=0,
    )
    rows = random_rows(sizes, (warmup + steps) * sizes.batch)
    dataset = [{"input_ids": ids, "labels": ids} for ids in rows]
    model = build_model(sizes, device)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=list(callbacks))
    return model, trainer


def run_trainer_row(impl: str, sizes: Sizes, steps: int, warmup: int, device) -> dict:
    """trainer:3+ckpt: ``trainer.train()``, timed from the end of step ``warmup`` to the end of
    the last step by a callback; train_step:3+ckpt: ``fzero.shard`` with the config that Trainer
    resolves, and ``train_step`` over its dataloader (the same batches, the same loading)."""
    from transformers import TrainerCallback

    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["start"] = _start_timing(device)
            elif state.global_step == warmup + steps:
                synchronize(device)
                marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as output_dir:
        model, trainer = make_trainer(sizes, steps, warmup, device, output_dir, [Timer()])
        if impl == "trainer:3+ckpt":
            trainer.train()
            loss = trainer.engine.metrics["loss"]
            elapsed = marks["end"] - marks["start"]
        elif impl == "train_step:3+ckpt":
            import fzero

            config = trainer.fzero_config(warmup + steps)
            enable_checkpointing(model)
            state = fzero.shard(model, config=config)
            for index, batch in enumerate(trainer.get_train_dataloader()):
                batch = {key: value.to(device) for key, value in batch.items()}
                state, metrics = fzero.train_step(state, batch)
                if index + 1 == warmup:  # where the Trainer's callback starts its clock
                    start = _start_timing(device)
            synchronize(device)
            elapsed, loss = time.perf_counter() - start, metrics["loss"]
        else:
            raise ValueError(f"unknown implementation {impl!r}")
    return _timed(impl, sizes, device, model, elapsed, steps, loss)
