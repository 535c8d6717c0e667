"""Train a small GPT with fzero on every rank torchrun starts (CPU with gloo, or GPUs with NCCL).

    torchrun --nproc_per_node 2 examples/train_gpt.py --stage 3 --steps 200

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights")
    parser.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--print-schedule", action="store_true")
    args = parser.parse_args()

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
    config = {
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1},
        },
        "gradient_clipping": 1.0,
        "gradient_accumulation_steps": args.micro_batches,
        "bf16": {"enabled": args.bf16},
        "fp16": {"enabled": args.fp16},
        "fzero": {"no_weight_decay": ["*.bias", "*ln_*", "*wpe*"]},
    }
    state = fzero.shard(model, stage=args.stage, config=config)
    if rank == 0:
        print(
            f"fzero: GPT {num_params(model) / 1e6:.2f}M parameters, ZeRO stage {args.stage}, "
            f"{world_size} rank(s) on {device.type}, "
            f"{'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}",
            flush=True,
        )
        if args.print_schedule:
            print(state.schedule, flush=True)

    corpus = MarkovCorpus(cfg.vocab_size)
    generator = torch.Generator().manual_seed(1000 + rank)
    tokens_per_step = args.batch_size * args.seq_len * args.micro_batches * world_size
    start, seen = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        micro = [
            tuple(t.to(device) for t in corpus.batch(args.batch_size, args.seq_len, generator))
            for _ in range(args.micro_batches)
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
                    f"memory {_memory(device)} | stage {args.stage}"
                    + (f" | loss scale {metrics['loss_scale']:g}" if args.fp16 else "")
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
