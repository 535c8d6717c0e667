"""Plan fzero's offload rows of ``benchmarks/offload.py`` without a GPU: each configuration's
schedule from ``fzero.plan_schedule`` on the model built on the meta device, its simulated step
(the default cost model and the one calibrated from the H200's measured steps, as offload.py
reports them beside its measurements), the simulator's device peak, and the host bytes
``fzero.estimate_memory`` gives. Nothing is allocated, so the 3.9B rows plan on a laptop.

    python benchmarks/offload_plan.py --model 3.9b --ckpt --impls fzero:3+opt fzero:3+opt+r0.8

These are predictions, not measurements: ``benchmarks/RESULTS.md`` has the simulator beside
the measured rows (at 3.9B within 1-2% for optimizer offload, 18% under for parameter offload).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from offload import calibrated_cost, fzero_config  # noqa: E402
from step import MODELS, build_model  # noqa: E402

import fzero  # noqa: E402
from fzero.memory import estimate_memory  # noqa: E402
from fzero.schedule import simulate, verify  # noqa: E402

GIB = 2**30


def plan_one(impl: str, model_name: str, ckpt: bool) -> dict:
    kind, _, rest = impl.partition(":")
    if kind != "fzero":
        raise SystemExit(f"{impl}: only fzero's rows can be planned (the peers run to be measured)")
    stage, *options = rest.split("+")
    options = set(options)
    model, batch, spec = build_model(model_name, torch.device("meta"))
    if ckpt:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for index in range(len(model.h)):
            model.h[index] = checkpoint_wrapper(model.h[index])
    config = fzero_config(int(stage), options, pin=True, bf16=True)
    schedule = fzero.plan_schedule(model, config=config)
    verify(schedule)
    tokens = batch * spec["block_size"]
    calibrated = simulate(schedule, calibrated_cost(tokens))
    zero = config["zero_optimization"]
    ratio = zero.get("offload_optimizer", {}).get("ratio", 1.0)
    largest = max(u.optimizer_numel for u in schedule.units)
    estimate = estimate_memory(
        model,
        1,
        int(stage),
        grad_accum_dtype=config.get("data_types", {}).get("grad_accum_dtype", "fp32"),
        offload_optimizer="cpu" if "offload_optimizer" in zero else "none",
        offload_param="cpu" if "offload_param" in zero else "none",
        offload_ratio=ratio,
        largest_unit_numel=largest,
    )
    numel = sum(p.numel() for p in model.parameters())
    step = calibrated.step_seconds
    return {
        "impl": impl,
        "model": model_name,
        "simulated_ms": 1e3 * simulate(schedule).step_seconds,
        "simulated_calibrated_ms": 1e3 * step,
        "predicted_tokens_per_s": tokens / step,
        "simulated_peak_gib": calibrated.peak_memory.total / GIB,
        "estimate_gpu_gib": estimate.gpu_nbytes / GIB,
        "estimate_host_gib": estimate.host_nbytes / GIB,
        "host_bytes_per_param": estimate.host_nbytes / numel,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="3.9b", choices=sorted(MODELS))
    parser.add_argument("--impls", nargs="+", default=["fzero:3+opt", "fzero:3+opt+r0.8"])
    parser.add_argument("--ckpt", action="store_true", help="checkpoint every block")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = [plan_one(impl, args.model, args.ckpt) for impl in args.impls]
    print(
        f"{'impl':28} {'sim ms':>8} {'sim cal':>8} {'tokens/s':>9} {'sim peak':>9} "
        f"{'est GPU':>8} {'est host':>9} {'host B/p':>8}"
    )
    for r in rows:
        print(
            f"{r['impl']:28} {r['simulated_ms']:>8.0f} {r['simulated_calibrated_ms']:>8.0f} "
            f"{r['predicted_tokens_per_s']:>9.0f} {r['simulated_peak_gib']:>9.2f} "
            f"{r['estimate_gpu_gib']:>8.2f} {r['estimate_host_gib']:>9.2f} "
            f"{r['host_bytes_per_param']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
