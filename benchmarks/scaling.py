"""Scaling over several GPUs: fzero stage 3 and FSDP2 at world sizes 1, 2, 4, 8 on one host,
with the simulator's prediction of each world size from the one-GPU run.

    python benchmarks/scaling.py --model 1.4b --worlds 1 2 4 8     # GPUs: one process each
    python benchmarks/scaling.py --cpu-smoke                       # CI: gloo, 2 CPU ranks

Each (implementation, world size) runs under ``torch.distributed.run`` (torchrun), one
process per GPU, every rank with ``benchmarks/step.py``'s model, batch and step: the per-GPU
batch stays the same as N grows (weak scaling). Reported per row: tokens/s over all ranks,
tokens/s per GPU, scaling efficiency (tokens/s at N / (N x tokens/s at 1) of the same
implementation), the largest peak allocated memory of any rank, and the ratio to FSDP2 at
the same N.

For fzero, the world-size-1 run is also recorded with ``record_timeline=True`` and turned into
a cost model (each unit's forward and backward time, the optimizer's bandwidth; see
``benchmarks/timeline.py``). Each N > 1 run measures its all-gather bandwidth (a 64 MiB
all-gather, timed) and predicts its own step with ``fzero.schedule.simulate`` over its real
schedule: "predicted ms" next to the measured step, and "exposed comm ms", the measured step
less the simulated step with free communication (what the collectives add that overlap did
not hide). Nothing here is measured unless it ran: world sizes above the GPUs present are
skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from children import child_args, print_result, run_child  # noqa: E402


def _child(args) -> None:
    import torch.distributed as dist
    from step import _batches, build_model, make_step

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batch, spec = build_model(args.model, device)
    step, _ = make_step(args.one, model, device)
    batches = _batches(batch, spec, device)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    # The slowest rank sets the pace; the largest peak is what a GPU must hold.
    worst = torch.tensor([elapsed, float(peak)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    elapsed, peak = worst.tolist()
    step_seconds = elapsed / args.steps
    result = {
        "impl": args.one,
        "model": args.model,
        "world_size": world,
        "tokens_per_s": world * batch * spec["block_size"] / step_seconds,
        "step_ms": 1e3 * step_seconds,
        "peak_gib": peak / 2**30,
    }
    if args.cost and args.one.startswith("fzero") and world > 1:
        result.update(_predict(step, args.cost, world, device, step_seconds))
    if rank == 0:
        print_result(result)
    dist.barrier()  # every rank is done with the others
    # Leave without running the process group's C++ destructors: gloo's teardown at exit
    # sometimes aborts ("terminate called without an active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _all_gather_bandwidth(world: int, device: torch.device, nbytes: int = 64 << 20) -> float:
    """Bytes per second one rank moves in a ring all-gather of ``nbytes`` (the simulator's
    ``bandwidth_bytes_per_second``), from the median of five timed runs."""
    import torch.distributed as dist

    out = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    shard = out[: out.numel() // world].clone()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(7):
        sync()
        start = time.perf_counter()
        dist.all_gather_into_tensor(out, shard)
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[2:])[2]
    return (world - 1) / world * nbytes / seconds


def _predict(step, cost_path: Path, world: int, device: torch.device, measured: float) -> dict:
    from fzero.schedule import CostModel, simulate

    data = json.loads(Path(cost_path).read_text())
    for key in ("forward_seconds", "backward_seconds"):
        data[key] = {int(unit): seconds for unit, seconds in data[key].items()}
    bandwidth = _all_gather_bandwidth(world, device)
    cost = replace(CostModel(**data), bandwidth_bytes_per_second=bandwidth)
    schedule = step.state().schedule
    predicted = simulate(schedule, cost).step_seconds
    free = simulate(
        schedule, replace(cost, bandwidth_bytes_per_second=float("inf"), latency_seconds=0.0)
    ).step_seconds
    return {
        "all_gather_gbps": bandwidth / 1e9,
        "predicted_ms": 1e3 * predicted,
        "exposed_comm_ms": 1e3 * max(measured - free, 0.0),
    }


def _calibrate(args) -> None:
    """World size 1: record a stage-3 step's timeline and write its cost model to args.cost."""
    from timeline import calibrate, measure

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    state, timeline, _ = measure(args.model, 1, device)
    cost = calibrate(state, timeline)
    Path(args.cost).write_text(json.dumps(asdict(cost)))


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | impl | N | tokens/s | tokens/s per GPU | efficiency | peak GiB (max rank) | "
        "step ms | predicted ms | exposed comm ms | tok/s vs FSDP2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next((r for r in rows if r["impl"] == row["impl"] and r["world_size"] == 1), None)
        fsdp = next(
            (r for r in rows if r["impl"] == "fsdp2" and r["world_size"] == row["world_size"]),
            None,
        )
        n, tokens = row["world_size"], row["tokens_per_s"]

        def shown(value, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        efficiency = tokens / (n * base["tokens_per_s"]) if base else None
        versus = tokens / fsdp["tokens_per_s"] if fsdp else None
        lines.append(
            f"| {row['model']} | {row['impl']} | {n} | {tokens / 1e3:,.1f}k | "
            f"{tokens / n / 1e3:,.1f}k | {shown(efficiency, '.3f')} | {row['peak_gib']:.2f} | "
            f"{row['step_ms']:.1f} | {shown(row.get('predicted_ms'), '.1f')} | "
            f"{shown(row.get('exposed_comm_ms'), '.1f')} | {shown(versus, '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1.4b")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--impls", nargs="+", default=["fsdp2", "fzero:3"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model, gloo, 1 and 2 CPU ranks, 2 steps"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--out", type=Path, default=Path("out"), help="the cost model's folder")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cost", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibrate:
        _calibrate(args)
        return
    if args.one:
        _child(args)
        return
    if args.cpu_smoke:
        args.model, args.worlds, args.steps, args.warmup = "tiny", [1, 2], 2, 1
    available = torch.cuda.device_count() if not args.cpu_smoke else os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    cost = args.out / f"cost_{args.model}.json"
    common = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--cpu-smoke"] if args.cpu_smoke else []
    if any(i.startswith("fzero") for i in args.impls):
        subprocess.run(
            [sys.executable, __file__, "--calibrate", "--cost", str(cost), *common], check=True
        )
    rows = []
    for world in args.worlds:
        if world > available:
            print(f"skip N={world}: {available} {'GPUs' if not args.cpu_smoke else 'CPUs'} here")
            continue
        for impl in args.impls:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc_per_node={world}"]
            command += child_args(__file__, impl, args.model, args.steps, args.warmup)
            command += ["--cost", str(cost)] + (["--cpu-smoke"] if args.cpu_smoke else [])
            row = run_child(command, f"{impl} at N={world}")
            if row is not None:
                rows.append(row)
                print(_table(rows).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if len(rows) < sum(1 for w in args.worlds if w <= available) * len(args.impls):
        sys.exit(1)


if __name__ == "__main__":
    main()
