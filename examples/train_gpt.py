"""Train a small GPT with fzero on every rank torchrun starts (CPU with gloo, or GPUs with NCCL).

    torchrun --nproc_per_node 2 examples/train_gpt.py --stage 3 --steps 200
    torchrun --nproc_per_node 2 examples/train_gpt.py --deepspeed ds_config.json

Each rank trains on its own generated micro-batches; the loss printed is the mean over ranks.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt import GPT, GPTConfig, MarkovCorpus, num_params  # noqa: E402

import fzero  # noqa: E402
from fzero.collectives import init_from_env, shutdown  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--deepspeed",
        metavar="ds_config.json",
        help="a DeepSpeed config (JSON or HJSON) to train with instead of the built-in one; "
        "its stage, optimizer, scheduler, precision and batch sizes are used, and its "
        '"auto" values take DeepSpeed\'s defaults (logged). Not with --lr, --bf16, --fp16 '
        "(default: none, the built-in config: AdamW, betas 0.9/0.95, weight decay 0.1 "
        "except biases and norms, clipping 1.0)",
    )
    parser.add_argument(
        "--stage",
        type=int,
        default=None,
        help="ZeRO stage 0-3; overrides the --deepspeed file's zero_optimization.stage "
        "(default: that stage, else 3)",
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="optimizer steps to run (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="sequences per micro-batch (default: the --deepspeed file's "
        "train_micro_batch_size_per_gpu when it is a number, else 8)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)"
    )
    parser.add_argument(
        "--n-layer", type=int, default=4, help="transformer blocks (default: %(default)s)"
    )
    parser.add_argument(
        "--n-embd", type=int, default=128, help="hidden size, 32 per head (default: %(default)s)"
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches accumulated into one step (default: the config's "
        "gradient_accumulation_steps, else 1)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="AdamW learning rate (default: 3e-3)"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 compute, fp32 master weights (default: off, fp32)"
    )
    parser.add_argument(
        "--fp16", action="store_true", help="fp16 with dynamic loss scaling (default: off)"
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="steps between printed lines (default: %(default)s)",
    )
    parser.add_argument(
        "--print-schedule",
        action="store_true",
        help="print the step's ops before training (default: off)",
    )
    args = parser.parse_args()
    if args.deepspeed and (args.lr is not None or args.bf16 or args.fp16):
        parser.error(
            "--lr, --bf16 and --fp16 set the built-in config; with --deepspeed, set "
            "them in the file"
        )
    return args


def built_in_config(args: argparse.Namespace) -> dict:
    return {
        "zero_optimization": {"stage": 3 if args.stage is None else args.stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": args.lr or 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
        },
        "gradient_clipping": 1.0,
        "gradient_accumulation_steps": args.micro_batches or 1,
        "bf16": {"enabled": args.bf16},
        "fp16": {"enabled": args.fp16},
        "fzero": {"no_weight_decay": ["*.bias", "*ln_*", "*wpe*"]},
    }


def main() -> None:
    args = parse_args()
    rank, world_size, device = init_from_env()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core per rank
    torch.manual_seed(0)
    cfg = GPTConfig(
        block_size=args.seq_len,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=max(1, args.n_embd // 32),
    )
    model = GPT(cfg).to(device)
    config = fzero.Config.from_any(args.deepspeed or built_in_config(args))
    state = fzero.shard(model, stage=args.stage, config=config, total_num_steps=args.steps)
    resolved = state.runtime.config
    micro_batches = args.micro_batches or resolved.gradient_accumulation_steps or 1
    batch_size = args.batch_size or (
        resolved.train_micro_batch_size_per_gpu
        if isinstance(resolved.train_micro_batch_size_per_gpu, int)
        else 8
    )
    fp16 = resolved.compute_dtype_name == "fp16"
    if rank == 0:
        print(
            f"fzero: GPT {num_params(model) / 1e6:.2f}M parameters, ZeRO stage {resolved.stage}, "
            f"{world_size} rank(s) on {device.type}, {resolved.compute_dtype_name}",
            flush=True,
        )
        if args.print_schedule:
            print(state.schedule, flush=True)

    corpus = MarkovCorpus(cfg.vocab_size)
    generator = torch.Generator().manual_seed(1000 + rank)
    tokens_per_step = batch_size * args.seq_len * micro_batches * world_size
    start, seen = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        micro = [
            tuple(t.to(device) for t in corpus.batch(batch_size, args.seq_len, generator))
            for _ in range(micro_batches)
        ]
        state, metrics = fzero.train_step(state, micro if len(micro) > 1 else micro[0])
        seen += tokens_per_step
        if step % args.log_every == 0 or step == args.steps:
            loss = float(metrics["loss"])  # the one host sync per logging interval
            elapsed = time.perf_counter() - start
            if rank == 0:
                print(
                    f"step {step:5d} | loss {loss:.4f} | grad norm "
                    f"{float(metrics['grad_norm']):.3f} | {seen / elapsed:,.0f} tokens/s | "
                    f"memory {_memory(device)} | stage {resolved.stage}"
                    + (f" | loss scale {metrics['loss_scale']:g}" if fp16 else "")
                    + f" | skipped {metrics['skipped_steps']}",
                    flush=True,
                )
    shutdown()


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB peak RSS"


if __name__ == "__main__":
    main()
