"""Training-step benchmark: fzero (stages 1-3) side by side with FSDP2, plain PyTorch and, when
installed, DeepSpeed ZeRO, on the same GPT, in the same run.

    python benchmarks/step.py --models 255m 1.4b            # on a GPU: the full table
    python benchmarks/step.py --cpu-smoke                   # CI: tiny model, a few steps on CPU

Each configuration runs in a fresh process so that peak memory is its own. Reported per row:
tokens/s, MFU, peak allocated memory during the timed steps (set-up and warm-up excluded; the
set-up peak is in the JSON), step time, the host time fzero's executor spends inside its ops
per timed step (wall and thread CPU time; kernel launches included), and the ratio of tokens/s
and peak memory to FSDP2's.

FLOPs per token (for MFU): 6 * N + 12 * n_layer * n_embd * seq_len, where N counts every
parameter except the position embedding (PaLM's formula: weights forward and backward, plus
attention scores). Peak: 989 TFLOP/s dense bf16 (H100 SXM datasheet) unless --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import child_args, importable, print_result, run_child  # noqa: E402

MODELS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, block_size=64, batch=4),
    "255m": dict(n_layer=12, n_embd=1024, n_head=16, vocab_size=50304, block_size=1024, batch=16),
    "1.4b": dict(n_layer=24, n_embd=2048, n_head=16, vocab_size=50304, block_size=2048, batch=8),
    # Larger than a 24 GiB card's model states (benchmarks/offload.py --gpu-memory-gib 24)
    "3.9b": dict(n_layer=32, n_embd=3072, n_head=24, vocab_size=50304, block_size=2048, batch=4),
}
DEFAULT_IMPLS = [
    "fsdp2",
    "fsdp2:emb",
    "torch",
    "fzero:3",
    "fzero:3+emb",
    "fzero:2",
    "fzero:1",
    "deepspeed:3",
]


def build_model(name: str, device: torch.device):
    """The GPT of ``name`` on ``device`` (its parameters; the batches go to the GPU anyway)."""
    from gpt import GPT, GPTConfig

    spec = dict(MODELS[name])
    batch = spec.pop("batch")
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(**spec, tie_weights=False))
    return model, batch, spec


def flops_per_token(model, spec) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n + 12 * spec["n_layer"] * spec["n_embd"] * spec["block_size"]


def _batches(batch: int, spec: dict, device: torch.device, count: int = 4):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, spec["block_size"])
    return [
        (
            torch.randint(spec["vocab_size"], shape, device=device, generator=g),
            torch.randint(spec["vocab_size"], shape, device=device, generator=g),
        )
        for _ in range(count)
    ]


def _optimizer_config(lr: float = 3e-4) -> dict:
    return {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.1}}


def _init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        # DeepSpeed reads the launcher's variables even when the group already exists.
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
        dist.init_process_group(backend, rank=0, world_size=1)


def make_step(impl: str, model, device: torch.device):
    """Returns step(batch) -> loss tensor and a dict of extra numbers to report."""
    kind, _, stage = impl.partition(":")
    stage, _, fake_world = stage.partition("@")  # fzero:3@64: rank 0 of a simulated world
    # fzero:3+compile: torch.compile each block; fzero:3+emb: fzero.embedding_units;
    # fzero:3+ckpt: activation checkpointing of every block (number_checkpoints)
    stage, *options = stage.split("+")
    if set(options) - {"compile", "emb", "ckpt"}:
        raise ValueError(f"{impl!r}: options are +compile, +emb and +ckpt")
    bf16 = device.type == "cuda"
    if kind == "fzero":
        import fzero

        config = {
            "optimizer": _optimizer_config(),
            "gradient_clipping": 1.0,
            "bf16": {"enabled": bf16},
            # Release each block after its forward, as FSDP2's default reshard_after_forward
            # does (DeepSpeed's default reuse distance, 1e9, keeps every block of these models
            # gathered into backward: faster, and more memory).
            # and prefetch one block ahead, as FSDP2's default backward/forward prefetch does.
            "zero_optimization": {
                "stage3_max_reuse_distance": 0,
                "stage3_prefetch_bucket_size": 0,
            },
            "fzero": {
                "compile_units": "compile" in options,
                "embedding_units": "emb" in options,
            },
        }
        if "ckpt" in options:  # more than there are: every block
            config["activation_checkpointing"] = {"number_checkpoints": 1 << 30}
        world = int(fake_world) if fake_world else None
        box = {
            "state": fzero.shard(model, stage=int(stage), config=config, simulate_world_size=world)
        }

        def step(batch):
            box["state"], metrics = fzero.train_step(box["state"], batch)
            return metrics["loss"]

        def start_timing():  # executor counters from here on: the timed steps only
            executor = box["state"].runtime.executor
            box["base"] = (executor.host_seconds, executor.host_cpu_seconds, executor.steps_run)

        step.start_timing = start_timing
        step.state = lambda: box["state"]

        def extra():
            from fzero.memory import estimate_memory

            executor = box["state"].runtime.executor
            estimate = estimate_memory(
                box["state"].layout.numel,
                world or 1,
                int(stage),
                compute_dtype="bf16" if bf16 else "fp32",
                grad_accum_dtype="fp32",
                layout="fzero",
            )
            wall, cpu, steps = box.get("base", (0.0, 0.0, 0))
            steps = max(executor.steps_run - steps, 1)
            return {
                "executor_host_ms_per_step": 1e3 * (executor.host_seconds - wall) / steps,
                "executor_cpu_ms_per_step": 1e3 * (executor.host_cpu_seconds - cpu) / steps,
                "world_size": world or 1,
                "estimate_model_states_gib": estimate.total / 2**30,
            }

        return step, extra
    if kind in ("fsdp2", "torch"):
        if kind == "fsdp2":  # fsdp2:emb: the embeddings wrapped too (fzero:N+emb)
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            _init_single_process_group(device)
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
            )
            if stage == "ckpt":  # fsdp2:ckpt: every block checkpointed, as fzero:3+ckpt
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                    checkpoint_wrapper,
                )

                for index in range(len(model.h)):
                    model.h[index] = checkpoint_wrapper(model.h[index])
            for block in model.h:
                fully_shard(block, mp_policy=policy)
            if stage == "emb":
                fully_shard(model.wte, mp_policy=policy)
                fully_shard(model.wpe, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(
            model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused
        )
        autocast = kind == "torch" and bf16

        def step(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, dict
    if kind == "deepspeed":
        return deepspeed_step(model, device, {"stage": int(stage)}), dict
    raise ValueError(f"unknown implementation {impl!r}")


def deepspeed_step(model, device: torch.device, zero_optimization: dict):
    """A DeepSpeed engine over ``model`` with this file's optimizer, clipping and precision and
    the given ``zero_optimization`` block; returns step(batch) -> loss."""
    import deepspeed

    _init_single_process_group(device)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": _optimizer_config(),
        "gradient_clipping": 1.0,
        "bf16": {"enabled": device.type == "cuda"},
        "zero_optimization": zero_optimization,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )

    def step(batch):
        loss = engine(*batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def run_one(
    impl: str,
    model_name: str,
    steps: int,
    warmup: int,
    device: torch.device,
    make=None,
    build_device: torch.device | None = None,
) -> dict:
    """One configuration's timed steps; ``make`` builds its step (default: this file's
    ``make_step``; benchmarks/offload.py passes its own). ``build_device``: where the model is
    built (default ``device``; the host for models larger than the GPU, which each library
    then places itself)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, batch, spec = build_model(model_name, build_device or device)
    flops = flops_per_token(model, spec)
    step, extra = (make or make_step)(impl, model, device)
    batches = _batches(batch, spec, device)
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    setup_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":  # the training peak: steady-state steps, set-up excluded
        torch.cuda.reset_peak_memory_stats(device)
    if hasattr(step, "start_timing"):
        step.start_timing()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    sync()
    elapsed = time.perf_counter() - start
    tokens = steps * batch * spec["block_size"]
    result = {
        "impl": impl,
        "model": model_name,
        "tokens_per_s": tokens / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "flops_per_token": flops,
        "loss": float(loss),
        "peak_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else float("nan")
        ),
        "setup_peak_gib": setup_peak / 2**30,
    }
    result.update(extra())
    return result


def _child(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = run_one(args.one, args.model, args.steps, args.warmup, device)
    print_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["255m"], choices=list(MODELS))
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny model on CPU, 3 steps, fzero stages 0-3 and plain torch",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args)
        return
    if args.cpu_smoke:
        args.models, args.steps, args.warmup = ["tiny"], 3, 1
        args.impls = ["torch", "fzero:0", "fzero:1", "fzero:2", "fzero:3"]
    rows = []
    for model_name in args.models:
        for impl in args.impls:
            if impl.startswith("deepspeed") and not importable("deepspeed"):
                print(f"skip {impl}: deepspeed is not installed", flush=True)
                continue
            command = [
                sys.executable,
                *child_args(__file__, impl, model_name, args.steps, args.warmup),
            ]
            command += ["--cpu-smoke"] if args.cpu_smoke else []
            row = run_child(command, f"{impl} on {model_name}")
            if row is None:
                rows.append({"impl": impl, "model": model_name, "failed": True})
                continue
            rows.append(row)
            print(_format(rows[-1], rows, args.peak_tflops), flush=True)
    print()
    print(_table(rows, args.peak_tflops))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(r.get("failed") for r in rows):
        sys.exit(1)


def _format(row: dict, rows: list[dict], peak_tflops: float) -> str:
    base = next(
        (
            r
            for r in rows
            if r["model"] == row["model"] and r["impl"] == "fsdp2" and not r.get("failed")
        ),
        None,
    )
    mfu = row["tokens_per_s"] * row["flops_per_token"] / (peak_tflops * 1e12)
    ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base else "-"
    mem_ratio = f"{row['peak_gib'] / base['peak_gib']:.3f}x" if base else "-"
    host, cpu = row.get("executor_host_ms_per_step"), row.get("executor_cpu_ms_per_step")
    host_text = f"{host:.2f} / {cpu:.2f}" if host is not None else "-"
    return (
        f"| {row['model']} | {row['impl']} | {row['tokens_per_s'] / 1e3:,.1f}k | "
        f"{100 * mfu:.1f}% | {row['peak_gib']:.2f} | {row['step_ms']:.1f} | {host_text} | "
        f"{ratio} | {mem_ratio} |"
    )


def _table(rows: list[dict], peak_tflops: float) -> str:
    header = (
        "| model | impl | tokens/s | MFU | peak GiB | step ms | executor host ms wall / CPU | "
        "tok/s vs FSDP2 | peak vs FSDP2 |\n|---|---|---|---|---|---|---|---|---|"
    )
    body = [_format(r, rows, peak_tflops) for r in rows if not r.get("failed")]
    fake = [r for r in rows if r.get("world_size", 1) > 1]
    if fake:  # simulated worlds: measured per-rank peak next to the model-state estimate
        body += [
            "",
            "| model | impl | simulated ranks | measured peak GiB per rank | "
            "estimate_memory model states GiB |",
            "|---|---|---|---|---|",
        ]
        body += [
            f"| {r['model']} | {r['impl']} | {r['world_size']} | {r['peak_gib']:.2f} | "
            f"{r['estimate_model_states_gib']:.2f} |"
            for r in fake
        ]
    return "\n".join([header, *body])


if __name__ == "__main__":
    main()
