"""The CPU AdamW step of optimizer offload: fzero's against torch's fused CPU AdamW and DeepSpeed's.

    python benchmarks/cpu_adamw.py                 # 2**28 fp32 elements, every variant
    python benchmarks/cpu_adamw.py --numel 2**25   # smaller
    python benchmarks/cpu_adamw.py --cpu-smoke     # CI: every variant once on 10,007 elements,
                                                   # in this process (its times mean nothing)

Each variant runs in a process of its own (its memory and thread pool are its own) and steps one
flat buffer of ``numel`` elements ``--steps`` times after one warm-up step; the median step is
reported. GB/s counts 28 bytes per element for every variant (read master, grad, exp_avg,
exp_avg_sq; write master, exp_avg, exp_avg_sq, all fp32), the issue's convention; the bf16
variant moves as much (2 bytes less gradient read, 2 more written for the bf16 parameters).

- ``fzero``: ``cpu_adamw_step``, fp32 gradient with a grad_scale, a 200-range decay table.
- ``fzero:bf16``: the same from a bf16 gradient, writing bf16 parameters for the upload.
- ``fzero:torch-ops``: ``adamw_step_cpu``, the chunked reference (torch elementwise ops).
- ``torch``: ``torch.optim.AdamW(fused=True)`` on the flat buffer, one decay.
- ``deepspeed``: ``DeepSpeedCPUAdam`` (adamw_mode) on the flat buffer, where deepspeed imports
  and its CPU Adam op builds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adamw import decay_table  # noqa: E402
from children import print_result, run_child  # noqa: E402

from fzero.kernels import WeightDecaySegments  # noqa: E402
from fzero.kernels.adamw import adamw_step_cpu  # noqa: E402
from fzero.kernels.cpu_adamw import cpu_adamw_step  # noqa: E402

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
BYTES_PER_ELEMENT = 28
VARIANTS = ("fzero", "fzero:bf16", "fzero:torch-ops", "torch", "deepspeed")


def buffers(numel: int) -> dict[str, torch.Tensor]:
    """Random data (never zeros, which can run faster than real data)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "master": torch.randn(numel, generator=generator),
        "grad": torch.randn(numel, generator=generator),
        "exp_avg": 0.1 * torch.randn(numel, generator=generator),
        "exp_avg_sq": (0.1 * torch.randn(numel, generator=generator)).square_(),
    }


def make_step(variant: str, numel: int):
    """A function doing one optimizer step of ``variant``, or a string saying why there is none."""
    b = buffers(numel)
    if variant.startswith("fzero"):
        decay = decay_table(numel) if numel > 400 else WeightDecaySegments.uniform(numel, 0.1)
        step = torch.tensor(1.0)
        kwargs = {"step": step, "decay": decay, "grad_scale": torch.tensor(0.5), **HYPER}
        if variant == "fzero:bf16":
            b["grad"] = b["grad"].to(torch.bfloat16)
            kwargs["param_out"] = torch.empty(numel, dtype=torch.bfloat16)
        kernel = adamw_step_cpu if variant == "fzero:torch-ops" else cpu_adamw_step

        def fzero_step():
            step.add_(1)
            kernel(b["master"], b["grad"], b["exp_avg"], b["exp_avg_sq"], **kwargs)

        return fzero_step
    param = torch.nn.Parameter(b["master"])
    param.grad = b["grad"]
    betas = (HYPER["beta1"], HYPER["beta2"])
    if variant == "torch":
        return torch.optim.AdamW(
            [param], lr=HYPER["lr"], betas=betas, eps=HYPER["eps"], weight_decay=0.1, fused=True
        ).step
    if variant == "deepspeed":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                [param], lr=HYPER["lr"], betas=betas, eps=HYPER["eps"], weight_decay=0.1,
                adamw_mode=True,
            )  # fmt: skip
        except Exception as error:  # not installed, or its C++ op does not build here
            return f"DeepSpeedCPUAdam unavailable: {type(error).__name__}: {error}"[:300]
        return optimizer.step
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def run_one(variant: str, numel: int, steps: int) -> dict:
    """The child: time ``steps`` steps after one warm-up, print one RESULT line and return it."""
    step = make_step(variant, numel)
    if isinstance(step, str):
        print_result({"variant": variant, "skipped": step})
        return {"variant": variant, "skipped": step}
    step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    row = {
        "variant": variant,
        "numel": numel,
        "ms": median * 1e3,
        "gb_per_s": numel * BYTES_PER_ELEMENT / median / 1e9,
        "threads": torch.get_num_threads(),
    }
    print_result(row)
    return row


def main(
    numel: int, steps: int, variants: tuple[str, ...], json_path: str | None, in_process: bool
) -> list:
    """Run every variant (each in a child process unless ``in_process``) and print the table."""
    print(f"cpu AdamW, {numel:,} fp32 elements ({numel * BYTES_PER_ELEMENT / 1e9:.2f} GB at "
          f"{BYTES_PER_ELEMENT} B/element), median of {steps} step(s); {os.cpu_count()} CPU(s), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")  # fmt: skip
    rows = []
    for variant in variants:
        if in_process:
            rows.append(run_one(variant, numel, steps))
            continue
        command = [sys.executable, __file__, "--one", variant, "--numel", str(numel)]
        row = run_child([*command, "--steps", str(steps)], variant)
        if row is not None:
            rows.append(row)
    timed = {r["variant"]: r for r in rows if "ms" in r}
    print("| variant | ms | GB/s | vs torch | vs deepspeed |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['variant']} | skipped: {row['skipped']} | | | |")
            continue
        ratios = [timed[base]["ms"] / row["ms"] if base in timed else None for base in ("torch",
                  "deepspeed")]  # fmt: skip
        text = [f"{r:.2f}" if r is not None else "n/a" for r in ratios]
        print(f"| {row['variant']} | {row['ms']:.1f} | {row['gb_per_s']:.1f} | {text[0]} | "
              f"{text[1]} |")  # fmt: skip
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", default=str(1 << 28), help="elements, e.g. 268435456 or 2**28")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run of every variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    base, _, exponent = args.numel.partition("**")
    numel = int(base) ** int(exponent) if exponent else int(base)
    if args.one:
        run_one(args.one, numel, args.steps)
    elif args.cpu_smoke:
        main(10_007, 1, tuple(args.variants), args.json, in_process=True)
    else:
        main(numel, args.steps, tuple(args.variants), args.json, in_process=False)
