"""Offload benchmark: fzero's CPU optimizer and parameter offload beside DeepSpeed's
ZeRO-Offload and FSDP2's CPUOffloadPolicy, on the GPT of examples/gpt.py (untied head, bf16).

    python benchmarks/offload.py --model 1.4b                 # on a GPU: the table
    python benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt   # larger than the card
    python benchmarks/offload.py --cpu-smoke                  # CI: tiny model, fzero only

``--gpu-memory-gib G`` caps each child's CUDA allocator at G GiB
(``torch.cuda.set_per_process_memory_fraction``) and builds the model on the host, so that each
library places it itself (a model larger than the cap could not be built on the card);
``--ckpt`` wraps every block in ``checkpoint_wrapper`` (torch.utils.checkpoint, non-reentrant)
for every implementation alike.

Each configuration runs in a process of its own (``step.run_one`` times it). Per row: tokens/s,
step time, GPU peak (allocated, timed steps), host peak RSS, and for fzero the simulator's step
time for its schedule with the default cost model (uncalibrated: its PCIe and CPU AdamW
bandwidths are the measured H200 figures, compute is the model's FLOPs at the default rate),
and the ratio to DeepSpeed's best row.

Implementations: fsdp2 (no offload), fsdp2:offload (CPUOffloadPolicy(pin_memory=True)),
deepspeed:2+opt, deepspeed:3+opt, deepspeed:3+opt+param, fzero:N (no offload), fzero:N+opt,
fzero:3+opt+param; fzero:3+opt+stepphase runs every CPU step in the step phase
(``fzero.offload_update_in_forward: false``); ``+rX`` (fzero:3+opt+r0.6, deepspeed:3+opt+r0.6)
is partial offload, ``offload_optimizer.ratio`` X, with parameter offload too in
fzero:3+opt+param+r0.7; fzero's ``+bf16grad`` keeps the reduced gradient in bf16
(``data_types.grad_accum_dtype``), the same values on one rank without accumulation
(autograd's gradients of bf16 parameters are bf16), in half the device and host memory.
fzero's ``+nvme`` (fzero:3+opt+nvme, fzero:3+opt+param+nvme) puts the offloaded buffers in swap
files under ``--nvme-dir`` instead of host memory (a scratch directory made there per run and
removed after it); its rows add the bytes the swap files hold on the disk.

``--host-memory-gib H`` leaves each row only H GiB of host memory (``host_cap.py``: a process
of its own holds the rest for the row's lifetime), the host's counterpart of the GPU cap: a row
whose offload does not fit is refused at ``fzero.shard`` with its estimate (the row says
"refused", needed against available), and NVMe rows show what trains in that much memory.
Every row reports its anonymous resident set after the steps (``host anon``) beside the whole
one: swap files are mapped into memory, and their pages, which the kernel can drop, count in the
resident set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from children import child_args, importable, print_result, run_child  # noqa: E402
from host_cap import HostCap  # noqa: E402
from step import (  # noqa: E402
    MODELS,  # noqa: E402
    _init_single_process_group,
    _optimizer_config,
    deepspeed_step,
)
from step import run_one as step_run_one  # noqa: E402

DEFAULT_IMPLS = [
    "fzero:3",
    "fsdp2",
    "fzero:2+opt",
    "fzero:3+opt",
    "fzero:3+opt+param",
    "fzero:3+opt+r0.6",
    "deepspeed:2+opt",
    "deepspeed:3+opt+r0.6",
    "deepspeed:3+opt",
    "deepspeed:3+opt+param",
    "fsdp2:offload",
]


NVME_DIR_NEEDED = "+nvme rows need --nvme-dir (a directory on the disk to swap to)"


def _zero_block(stage: int, options: set[str], pin: bool, nvme_dir: str | None = None) -> dict:
    zero: dict = {"stage": stage}
    offload = {"device": "cpu", "pin_memory": pin}
    if "nvme" in options:
        if not nvme_dir:
            raise ValueError(NVME_DIR_NEEDED)
        offload = {"device": "nvme", "pin_memory": pin, "nvme_path": nvme_dir}
    if "opt" in options:
        zero["offload_optimizer"] = dict(offload)
        # +r0.6: partial offload, that fraction of the optimizer state on the host
        ratios = [float(o[1:]) for o in options if o.startswith("r")]
        if ratios:
            zero["offload_optimizer"]["ratio"] = ratios[0]
    if "param" in options:
        zero["offload_param"] = dict(offload)
    return zero


# The simulator's cost model, calibrated from this machine's measured steps (H200, 2026-12-02):
# compute at fzero:3's 1.42B rate (58.4% of 989 TFLOP/s in benchmarks/step.py), torch's fused
# CPU AdamW at the 104 GB/s measured inside an offloaded step (benchmarks/offload_host_step.py),
# PCIe at the measured 53 GB/s each way (the cost model's default).
MEASURED_FLOPS_PER_SECOND = 0.584 * 989e12
MEASURED_CPU_ADAMW_BYTES_PER_SECOND = 104e9


def fzero_config(
    stage: int, options: set[str], pin: bool, bf16: bool, nvme_dir: str | None = None
) -> dict:
    """fzero's config for one row (``benchmarks/offload_plan.py`` plans the same ones)."""
    zero = _zero_block(stage, options, pin, nvme_dir)
    zero.update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    config = {
        # One micro-batch a step (what step() passes), so that under optimizer offload the
        # gradients stream down unit by unit instead of filling a whole device shard.
        "gradient_accumulation_steps": 1,
        "optimizer": _optimizer_config(),
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # +stepphase: every CPU step in the step phase (no overlap with the next forward)
        "fzero": {"offload_update_in_forward": "stepphase" not in options},
    }
    if "bf16grad" in options:  # exact here: one rank, no accumulation, bf16 gradients
        config["data_types"] = {"grad_accum_dtype": "bf16"}
    return config


def calibrated_cost(tokens_per_micro_batch: int):
    """The simulator's cost model calibrated from this machine's measured steps (above)."""
    from fzero.schedule import CostModel

    return CostModel(
        flops_per_second=MEASURED_FLOPS_PER_SECOND,
        tokens_per_micro_batch=tokens_per_micro_batch or 4096,
        cpu_optimizer_bytes_per_second=MEASURED_CPU_ADAMW_BYTES_PER_SECOND,
    )


def make_step(
    impl: str,
    model,
    device: torch.device,
    ckpt: bool = False,
    tokens_per_micro_batch: int = 0,
    nvme_dir: str | None = None,
):
    if ckpt:  # the same model code for every library: each block under torch.utils.checkpoint
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for index in range(len(model.h)):
            model.h[index] = checkpoint_wrapper(model.h[index])
    kind, _, rest = impl.partition(":")
    stage, *options = rest.split("+")
    options = set(options)
    bf16 = device.type == "cuda"
    pin = device.type == "cuda"
    if kind == "fzero":
        import fzero

        config = fzero_config(int(stage), options, pin, bf16, nvme_dir)
        box = {"state": fzero.shard(model, config=config, device=device)}

        def step(batch):
            box["state"], metrics = fzero.train_step(box["state"], batch)
            return metrics["loss"]

        def extra():
            from fzero.schedule import simulate

            default = simulate(box["state"].schedule).step_seconds
            calibrated = calibrated_cost(tokens_per_micro_batch)
            result = {
                "simulated_ms": 1e3 * default,
                "simulated_calibrated_ms": 1e3
                * simulate(box["state"].schedule, calibrated).step_seconds,
            }
            if nvme_dir and "nvme" in options:
                result["file_gib"] = _disk_nbytes(nvme_dir) / 2**30
            return result

        return step, extra
    if "nvme" in options:
        raise ValueError(f"{impl}: +nvme is measured for fzero only here")
    if kind == "deepspeed":
        return deepspeed_step(model, device, _zero_block(int(stage), options, pin)), dict
    if kind == "fsdp2":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        _init_single_process_group(device)
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
        )
        offload = CPUOffloadPolicy(pin_memory=pin) if stage == "offload" else None
        kwargs = {"mp_policy": policy} | ({"offload_policy": offload} if offload else {})
        for block in model.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=3e-4,
            betas=(0.9, 0.95),
            weight_decay=0.1,
            fused=offload is None and device.type == "cuda",
        )

        def step(batch):
            loss = model(*batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, dict
    raise ValueError(f"unknown implementation {impl!r}")


def _disk_nbytes(directory: str) -> int:
    """What the files under ``directory`` hold on the disk (allocated blocks, not sizes)."""
    total = 0
    for path in Path(directory).rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


def _resident_nbytes(field: str = "VmRSS") -> int:
    """This process's resident set now (``VmRSS``; ``RssAnon`` for its anonymous part, what
    mapped files do not account for), or 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(
    impl: str,
    model_name: str,
    steps: int,
    warmup: int,
    device: torch.device,
    gpu_memory_gib: float | None = None,
    ckpt: bool = False,
    nvme_dir: str | None = None,
) -> dict:
    """``step.run_one`` with this file's configurations, plus the host's peak resident set."""
    build_device = None
    if gpu_memory_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(gpu_memory_gib * 2**30 / total)
        build_device = torch.device("cpu")

    spec = MODELS[model_name]
    tokens = spec["batch"] * spec["block_size"]

    def make(impl, model, device):
        return make_step(
            impl, model, device, ckpt=ckpt, tokens_per_micro_batch=tokens, nvme_dir=nvme_dir
        )

    from fzero.errors import HostMemoryError

    try:
        result = step_run_one(
            impl, model_name, steps, warmup, device, make=make, build_device=build_device
        )
    except HostMemoryError as error:  # refused at shard, before training: a row of its own
        return {
            "impl": impl,
            "model": model_name,
            "refused": str(error),
            "needed_gib": error.needed_nbytes / 2**30,
            "available_gib": error.available_nbytes / 2**30,
        }
    result["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # After the timed steps: what training holds (the peak also counts building the model on
    # the host before a library took it over).
    result["host_rss_gib"] = _resident_nbytes() / 2**30
    result["host_anon_gib"] = _resident_nbytes("RssAnon") / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="1.4b")
    parser.add_argument("--impls", nargs="+", help="default: DEFAULT_IMPLS (the smoke: fzero's)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, fzero only")
    parser.add_argument("--gpu-memory-gib", type=float, help="cap the CUDA allocator (GiB)")
    parser.add_argument("--ckpt", action="store_true", help="checkpoint every block")
    parser.add_argument("--nvme-dir", help="a directory on the disk for the +nvme rows' swap files")
    parser.add_argument(
        "--host-memory-gib", type=float, help="leave each row this much host memory (GiB)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_smoke:
        args.model, args.steps, args.warmup = "tiny", 2, 1
        args.impls = args.impls or ["fzero:2", "fzero:2+opt", "fzero:3+opt", "fzero:3+opt+param"]
    args.impls = args.impls or DEFAULT_IMPLS
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.one:
        print_result(
            run_one(
                args.one,
                args.model,
                args.steps,
                args.warmup,
                device,
                args.gpu_memory_gib,
                args.ckpt,
                args.nvme_dir,
            )
        )
        return
    if any("+nvme" in impl for impl in args.impls) and not args.nvme_dir:
        parser.error(NVME_DIR_NEEDED)
    rows = []
    for impl in args.impls:
        if impl.startswith("deepspeed") and not importable("deepspeed"):
            print(f"skip {impl}: deepspeed is not installed", flush=True)
            continue
        command = [sys.executable, *child_args(__file__, impl, args.model, args.steps, args.warmup)]
        if args.cpu_smoke:
            command.append("--cpu-smoke")
        if args.gpu_memory_gib is not None:
            command += ["--gpu-memory-gib", str(args.gpu_memory_gib)]
        if args.ckpt:
            command.append("--ckpt")
        with contextlib.ExitStack() as scratch:
            if "+nvme" in impl:  # a fresh directory per row, removed after it
                directory = scratch.enter_context(tempfile.TemporaryDirectory(dir=args.nvme_dir))
                command += ["--nvme-dir", directory]
            cap = None
            if args.host_memory_gib is not None:
                cap = scratch.enter_context(HostCap(args.host_memory_gib))
            row = run_child(command, impl)
            if row is not None and cap is not None:
                row.update(cap.report)
                if (lost := cap.check()) is not None:
                    row["host_cap_error"] = lost
        if row is not None:
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _table(rows: list[dict]) -> str:
    deepspeed = [r["tokens_per_s"] for r in rows if r["impl"].startswith("deepspeed")]
    best = max(deepspeed, default=None)
    lines = [
        f"{'impl':24} {'tokens/s':>10} {'step ms':>9} {'sim ms':>8} {'sim cal':>8} "
        f"{'GPU GiB':>8} {'host GiB':>9} {'host now':>9} {'host anon':>9} {'file GiB':>9} "
        f"{'x DS best':>9}"
    ]
    for r in rows:
        if "refused" in r:
            lines.append(
                f"{r['impl']:24} refused at shard: needs {r['needed_gib']:.2f} GiB of host "
                f"memory, {r['available_gib']:.2f} available"
            )
            continue
        ratio = f"{r['tokens_per_s'] / best:.2f}" if best else "-"
        file_gib = f"{r['file_gib']:.2f}" if "file_gib" in r else "-"
        simulated = f"{r['simulated_ms']:.0f}" if "simulated_ms" in r else "-"
        calibrated = (
            f"{r['simulated_calibrated_ms']:.0f}" if "simulated_calibrated_ms" in r else "-"
        )
        lines.append(
            f"{r['impl']:24} {r['tokens_per_s']:>10.0f} {r['step_ms']:>9.1f} {simulated:>8} "
            f"{calibrated:>8} "
            f"{r['peak_gib']:>8.2f} {r['host_peak_rss_gib']:>9.2f} {r['host_rss_gib']:>9.2f} "
            f"{r['host_anon_gib']:>9.2f} {file_gib:>9} {ratio:>9}"
        )
        if "host_cap_error" in r:
            lines.append(f"  {r['impl']}: {r['host_cap_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
