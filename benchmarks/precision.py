"""What fzero's precision and reduction options cost, and fp16 against bf16 on a GPT.

    python benchmarks/precision.py                 # CPU, thread ranks: the two tables below
    python benchmarks/precision.py --fp16-curve    # CUDA: fp16 dynamic loss scaling vs bf16

CPU tables (thread ranks of one process, ``torch.set_num_threads(1)``; the example GPT of
``examples/gpt.py``, 4 layers, n_embd 128, 8 x 64 tokens per micro-batch):

1. ``fzero.deterministic`` against the default, per stage: seconds per step (the fastest of
   the timed steps), and the bytes each rank's reductions move per step (from the schedule).
2. ``fzero.reduce_every_micro_batch`` true (default) against false, stages 2 and 3, 4
   micro-batches: seconds per step (fastest), reduction bytes per step, and the peak transient
   gradient bytes: the schedule's annotation, and what the executor measured after each
   trigger's ops (by default a unit's gradients live only from inside its backward to its
   reduction, between two triggers, so they do not show there; kept for the step, they do).

``--fp16-curve`` trains the same GPT (stage 3) from the same initialisation on the same batches
in bf16 and fp16 (dynamic scaling, DeepSpeed's defaults: 2**16, window 1000, hysteresis 2) for
200 steps and prints the loss curves (means over 10-step windows), their largest relative
difference and the skipped steps. ``--with-plain`` adds fzero in fp32 and plain PyTorch mixed
precision (fp32 master weights, torch's AdamW) in each dtype: the spread between two fp32
implementations is the noise floor the fp16/bf16 difference is to be read against.
"""

from __future__ import annotations

import argparse
import fnmatch
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import fzero  # noqa: E402
from fzero.collectives import run_ranks  # noqa: E402
from fzero.config.lr_schedules import WarmupLR  # noqa: E402
from fzero.schedule import ops as O  # noqa: E402

REDUCTIONS = (O.ReduceScatter, O.AllReduce, O.ReduceInOrder)


def _model(n_layer: int = 4, n_embd: int = 128, block_size: int = 64):
    from gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, block_size=block_size))


def _batches(steps: int, world: int, micro: int, batch: int = 8, seq: int = 64):
    from gpt import MarkovCorpus

    corpus, g = MarkovCorpus(64), torch.Generator().manual_seed(0)
    return [
        [[corpus.batch(batch, seq, g) for _ in range(micro)] for _ in range(world)]
        for _ in range(steps)
    ]


def _reduction_nbytes(schedule, micro: int, world: int) -> int:
    """Bytes one rank sends in its gradient reductions in a step (ring algorithms: (N-1)/N of
    the buffer for a reduce-scatter or an all-to-all, twice that for an all-reduce, N-1 times
    the buffer for stage 0's ordered all-gather)."""
    total = 0.0
    for op in schedule.ops(micro):
        if isinstance(op, O.AllReduce):
            total += 2 * (world - 1) / world * op.nbytes
        elif isinstance(op, O.ReduceInOrder) and op.whole_unit:
            total += (world - 1) * op.nbytes
        elif isinstance(op, REDUCTIONS):
            total += (world - 1) / world * op.nbytes
        elif isinstance(op, O.ReduceScalarsInOrder):
            total += (world - 1) / world * op.grad_nbytes
    return int(total)


def run(stage: int, world: int, micro: int, fzero_block: dict, steps: int, warmup: int):
    """The fastest step's seconds on rank 0 (the minimum: robust to other work on a shared
    machine), the schedule, and the most transient gradient bytes the executor measured at any
    trigger."""
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "gradient_clipping": 1.0,
        "fzero": fzero_block,
    }
    models = [_model() for _ in range(world)]
    batches = _batches(steps + warmup, world, micro)

    def rank_main(comm):
        state = fzero.shard(models[comm.rank], stage=stage, config=config, process_group=comm)
        times = []
        for step in range(steps + warmup):
            start = time.perf_counter()
            state, metrics = fzero.train_step(state, batches[step][comm.rank])
            float(metrics["loss"])
            times.append(time.perf_counter() - start)
        executor = state.runtime.executor
        return min(times[warmup:]), executor.schedule

    seconds, schedule = run_ranks(world, rank_main)[0]
    peak = _measured_grad_peak(stage, world, micro, config)
    return seconds, schedule, peak


def _measured_grad_peak(stage, world, micro, config) -> int:
    models = [_model() for _ in range(world)]
    batches = _batches(2, world, micro)

    def rank_main(comm):
        state = fzero.shard(
            models[comm.rank], stage=stage, config=config, process_group=comm, record_ops=True
        )
        for step in batches:
            state, _ = fzero.train_step(state, step[comm.rank])
        return max(grads for _, _, grads in state.runtime.executor.live_log)

    return run_ranks(world, rank_main)[0]


def cpu_tables(steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    mib = 1 << 20
    print(f"torch {torch.__version__}, CPU, thread ranks, {steps} timed steps after {warmup}")
    print("\n1. fzero.deterministic (2 micro-batches per step)\n")
    print("| ranks | stage | default s/step | deterministic s/step | ratio | reduce MiB/step "
          "default | deterministic |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for world in (2, 4):
        for stage in range(4):
            base, base_schedule, _ = run(stage, world, 2, {}, steps, warmup)
            det, det_schedule, _ = run(stage, world, 2, {"deterministic": True}, steps, warmup)
            print(
                f"| {world} | {stage} | {base:.4f} | {det:.4f} | {det / base:.2f} | "
                f"{_reduction_nbytes(base_schedule, 2, world) / mib:.2f} | "
                f"{_reduction_nbytes(det_schedule, 2, world) / mib:.2f} |"
            )
    print("\n2. fzero.reduce_every_micro_batch (4 micro-batches per step)\n")
    print("| ranks | stage | every: s/step | reduce MiB | peak grad MiB (schedule / at triggers) "
          "| once: s/step | reduce MiB | peak grad MiB (schedule / at triggers) |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for world in (2, 4):
        for stage in (2, 3):
            row = [f"| {world} | {stage}"]
            for flag in (True, False):
                block = {"reduce_every_micro_batch": flag}
                seconds, schedule, measured = run(stage, world, 4, block, steps, warmup)
                row.append(
                    f"{seconds:.4f} | {_reduction_nbytes(schedule, 4, world) / mib:.2f} | "
                    f"{_grad_peak(schedule) / mib:.2f} / {measured / mib:.2f}"
                )
            print(" | ".join(row) + " |")


def _grad_peak(schedule) -> int:
    """The schedule's peak transient bytes less the gathered parameters alive there."""
    by_index = {u.index: u for u in schedule.units}
    peak, gathered = 0, set()
    for entries in (schedule.micro_step, schedule.last_micro_step or ()):
        for entry in entries:
            for op in entry.ops:
                if isinstance(op, O.AllGather):
                    gathered.add(op.unit)
                elif isinstance(op, O.Release):
                    gathered.discard(op.unit)
            params = sum(by_index[i].param_nbytes for i in gathered) if schedule.stage == 3 else 0
            peak = max(peak, entry.live_nbytes - params)
    return peak


NO_DECAY = ["*.bias", "*ln_*", "*wpe*"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _warmup(steps: int):
    """DeepSpeed's WarmupLR rising linearly over ``steps`` optimizer steps (None: constant lr)."""
    return WarmupLR(warmup_num_steps=steps, warmup_type="linear") if steps else None


def fzero_losses(precision: str, steps: int, device: torch.device, lr: float, warmup: int = 0):
    """Per-step losses, loss scales and skipped steps of fzero (stage 3) in ``precision``."""
    model = _model(n_layer=6, n_embd=256, block_size=128).to(device)
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95]}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "fzero": {"no_weight_decay": NO_DECAY},
    }
    if warmup:
        config["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_num_steps": warmup, "warmup_type": "linear"},
        }
    state = fzero.shard(model, stage=3, config=config)
    batches = _batches(steps, 1, 1, batch=16, seq=128)
    losses, scales, skipped = [], [], []
    for step in range(steps):
        ids, targets = (t.to(device) for t in batches[step][0][0])
        state, metrics = fzero.train_step(state, (ids, targets))
        losses.append(float(metrics["loss"]))
        scales.append(metrics["loss_scale"])
        if metrics["skipped"]:
            skipped.append(step + 1)
    return losses, scales, skipped


def plain_losses(
    precision: str, steps: int, device: torch.device, lr: float, warmup: int = 0
) -> list[float]:
    """The same training in plain PyTorch mixed precision: fp32 master weights and
    ``torch.optim.AdamW``, a ``precision`` copy of the model for forward and backward, the loss
    multiplied by a scale in fp16 that starts at 2**16 and halves at each overflow, whose step
    is skipped (torch.amp.GradScaler's back-off; DeepSpeed's hysteresis would keep the scale at
    the first overflow, which changes nothing else while no gradient underflows). With
    ``warmup``, the lr of each applied step follows the same WarmupLR as fzero's (skipped steps
    do not advance it, as in DeepSpeed)."""
    master = _model(n_layer=6, n_embd=256, block_size=128).to(device)
    compute = _model(n_layer=6, n_embd=256, block_size=128).to(device, DTYPES[precision])
    params, copies = dict(master.named_parameters()), dict(compute.named_parameters())
    plain = [p for n, p in params.items() if any(fnmatch.fnmatchcase(n, x) for x in NO_DECAY)]
    decay = [p for p in params.values() if all(p is not q for q in plain)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    scale = 2.0**16 if precision == "fp16" else 1.0
    batches, losses, applied, schedule = (
        _batches(steps, 1, 1, batch=16, seq=128),
        [],
        0,
        _warmup(warmup),
    )
    for step in range(steps):
        with torch.no_grad():
            for name, p in params.items():
                copies[name].copy_(p)
        compute.zero_grad(set_to_none=True)
        loss = compute(*(t.to(device) for t in batches[step][0][0]))
        (loss * scale).backward()
        for name, p in params.items():
            p.grad = copies[name].grad.float() / scale
        losses.append(loss.item())
        if not all(torch.isfinite(p.grad).all() for p in params.values()):
            scale /= 2  # skip the step
            continue
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(applied, lr) if schedule else lr
        opt.step()
        applied += 1
    return losses


def fp16_curve(steps: int, device_name: str, lr: float, with_plain: bool, warmup: int) -> None:
    device = torch.device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}: GPT 6 layers, n_embd 256, 16 x 128 tokens/step, "
          f"lr {lr:g}" + (f", linear warmup over {warmup} steps" if warmup else ""))  # fmt: skip
    curves, skipped = {}, {}
    columns = ["bf16", "fp16"] + (["fp32", "plain bf16", "plain fp16", "plain fp32"] * with_plain)
    for column in columns:
        if column.startswith("plain "):
            losses = plain_losses(column.split()[1], steps, device, lr, warmup)
        else:
            losses, scales, skipped[column] = fzero_losses(column, steps, device, lr, warmup)
            if column == "fp16":
                marks = sorted({1, 10, 50, steps} & set(range(1, steps + 1)))
                shown = ", ".join(f"step {m}: {scales[m - 1]:g}" for m in marks)
                print(f"fp16 loss scale after {shown}; skipped steps {skipped[column]}")
        curves[column] = [statistics.fmean(losses[i : i + 10]) for i in range(0, steps, 10)]
    print("| steps | " + " | ".join(f"{c} loss" for c in columns) + " | fp16 vs bf16 |")
    print("| ---: |" + " ---: |" * (len(columns) + 1))
    worst = 0.0
    for i in range(len(curves["bf16"])):
        b, f = curves["bf16"][i], curves["fp16"][i]
        worst = max(worst, abs(f - b) / b)
        values = " | ".join(f"{curves[c][i]:.4f}" for c in columns)
        print(f"| {10 * i + 1}-{10 * i + 10} | {values} | {abs(f - b) / b:.2%} |")
    print(f"largest fp16 vs bf16 relative difference {worst:.2%}; skipped steps: fp16 "
          f"{len(skipped['fp16'])}, bf16 {len(skipped['bf16'])}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16-curve", action="store_true", help="CUDA: fp16 vs bf16 losses")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="--fp16-curve: where to train")
    parser.add_argument("--lr", type=float, default=3e-3, help="--fp16-curve: learning rate")
    parser.add_argument(
        "--lr-warmup",
        type=int,
        default=0,
        help="--fp16-curve: DeepSpeed WarmupLR (linear) over this many steps; 0: constant lr",
    )
    parser.add_argument(
        "--with-plain", action="store_true", help="--fp16-curve: fzero fp32 and plain PyTorch too"
    )
    args = parser.parse_args()
    if args.fp16_curve:
        fp16_curve(args.steps or 200, args.device, args.lr, args.with_plain, args.lr_warmup)
    else:
        cpu_tables(args.steps or 8, args.warmup)


if __name__ == "__main__":
    main()
