"""Fused AdamW over one flat shard: fzero's Triton kernel against torch's fused AdamW and a copy.

    python benchmarks/adamw.py                  # CUDA: the table for 2**24, 2**27, 2**28 elements
    python benchmarks/adamw.py --sweep          # also time block shapes at 2**27 elements
    python benchmarks/adamw.py --cpu-smoke      # CI: tiny CPU run of every variant, no timings

Bytes counted per element are the fewest each variant's outputs need, each input read once and
each output written once: 28 for fp32 grad (read p, g, m, v; write p, m, v), 28 for bf16 grad plus
bf16 param_out (2 bytes fewer read, 2 more written), 30 for torch's fused AdamW followed by a bf16
cast (which really moves 34: the cast reads master again). The copy moves the same 28 bytes per
element (14 read, 14 written) and is the ceiling. Times are medians of triton.testing.do_bench,
which flushes L2 between calls, after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from fzero.kernels import WeightDecaySegments, adamw_reference, adamw_step  # noqa: E402

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
SIZES = (1 << 24, 1 << 27, 1 << 28)
SWEEP = ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16))


def decay_table(numel: int, segments: int = 200) -> WeightDecaySegments:
    """A layout-like table: `segments` ranges alternating decay 0.1 (weights) and 0 (biases)."""
    generator = torch.Generator().manual_seed(0)
    cuts = sorted((torch.randperm(numel - 1, generator=generator)[: segments - 1] + 1).tolist())
    bounds = [0, *cuts, numel]
    ranges = [
        (a, b, 0.1 if i % 2 == 0 else 0.0) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    return WeightDecaySegments.from_ranges(ranges, numel)


def make_buffers(numel: int, device: str) -> dict[str, torch.Tensor]:
    """Random data (never zeros, which can run faster than real data)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(numel, generator=generator, device=device)

    buffers = {
        "master": randn(),
        "grad": randn(),
        "exp_avg": randn(0.1),
        "exp_avg_sq": randn(0.1).square_(),
    }
    buffers["grad_bf16"] = buffers["grad"].to(torch.bfloat16)
    buffers["param_out"] = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return buffers


def fzero_variants(buffers: dict[str, torch.Tensor], decay: WeightDecaySegments, block=None):
    """letter -> (label, function, bytes per element counted, letter of torch with same outputs).

    `block` = (block_numel, num_warps) calls the Triton launcher directly with that shape.
    """
    b = buffers
    step = torch.tensor(10.0, device=b["master"].device)
    kernel = adamw_step
    if block is not None:
        from fzero.kernels.adamw_triton import adamw_step_triton

        def kernel(*args, **kwargs):
            adamw_step_triton(*args, block_numel=block[0], num_warps=block[1], **kwargs)

    def fp32_grad():
        kernel(
            b["master"], b["grad"], b["exp_avg"], b["exp_avg_sq"], step=step, decay=decay, **HYPER
        )

    def bf16_grad_bf16_out():
        kernel(
            b["master"], b["grad_bf16"], b["exp_avg"], b["exp_avg_sq"], step=step, decay=decay,
            param_out=b["param_out"], **HYPER,
        )  # fmt: skip

    return {
        "a": ("fzero, fp32 grad", fp32_grad, 28, "c"),
        "b": ("fzero, bf16 grad + bf16 param_out", bf16_grad_bf16_out, 28, "d"),
    }


def torch_variants(buffers: dict[str, torch.Tensor]):
    """torch.optim.AdamW(fused=True) on its own copy of the flat fp32 buffer (uniform decay)."""
    param = torch.nn.Parameter(buffers["master"].clone())
    param.grad = buffers["grad"]
    optimizer = torch.optim.AdamW(
        [param], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
        weight_decay=0.1, fused=True,
    )  # fmt: skip
    optimizer.step()  # creates the moments
    param_out = buffers["param_out"]

    def then_cast():
        optimizer.step()
        param_out.copy_(param.detach())

    return {
        "c": ("torch fused AdamW", optimizer.step, 28, "c"),
        "d": ("torch fused AdamW + bf16 cast", then_cast, 30, "d"),
    }


def copy_variant(numel: int, device: str):
    source = torch.randint(0, 255, (14 * numel,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return {"e": ("device-to-device copy", lambda: target.copy_(source), 28, None)}


def bench(function, rounds: int = 2) -> list[float]:
    """Median milliseconds of each of `rounds` do_bench runs (their spread shows the noise)."""
    from triton.testing import do_bench

    return [do_bench(function, warmup=100, rep=400, return_mode="median") for _ in range(rounds)]


def main_cuda(sizes: tuple[int, ...], sweep: bool, json_path: str | None) -> None:
    import triton

    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for numel in sizes:
        buffers = make_buffers(numel, "cuda")
        table = {
            **fzero_variants(buffers, decay_table(numel)),
            **torch_variants(buffers),
            **copy_variant(numel, "cuda"),
        }
        best_ms = {letter: min(bench(function)) for letter, (_, function, _, _) in table.items()}
        print(f"\nnumel = {numel:,} ({numel * 28 / 1e9:.2f} GB at 28 B/element)")
        print(f"{'variant':42} {'B/el':>4} {'ms':>7} {'GB/s':>6} {'of copy':>7} {'vs torch':>8}")
        for letter, (label, _, bytes_per_element, torch_letter) in table.items():
            ms = best_ms[letter]
            gb_per_s = numel * bytes_per_element / ms / 1e6
            of_copy = best_ms["e"] / ms * bytes_per_element / 28
            versus = best_ms[torch_letter] / ms if torch_letter else float("nan")
            print(
                f"({letter}) {label:38} {bytes_per_element:>4} {ms:>7.3f} {gb_per_s:>6.0f} "
                f"{of_copy:>7.3f} {versus:>8.2f}"
            )
            rows.append({"numel": numel, "variant": label, "ms": ms, "gb_per_s": gb_per_s})
        del buffers, table
        torch.cuda.empty_cache()
    if sweep:
        rows += run_sweep(1 << 27)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))


def run_sweep(numel: int) -> list[dict]:
    """GB/s of both fzero variants for each (block_numel, num_warps)."""
    buffers = make_buffers(numel, "cuda")
    decay = decay_table(numel)
    copy_ms = min(bench(copy_variant(numel, "cuda")["e"][1]))
    print(f"\nblock shapes at numel = {numel:,} (copy: {numel * 28 / copy_ms / 1e6:.0f} GB/s)")
    rows = []
    for block in SWEEP:
        line = f"block_numel={block[0]:5} num_warps={block[1]:2}:"
        for letter, (label, function, bytes_per_element, _) in fzero_variants(
            buffers, decay, block
        ).items():
            ms = min(bench(function))
            gb_per_s = numel * bytes_per_element / ms / 1e6
            line += f"  ({letter}) {gb_per_s:5.0f} GB/s = {copy_ms / ms:.3f} of copy"
            rows.append({"numel": numel, "block": block, "variant": label, "ms": ms})
        print(line)
    return rows


def main_cpu_smoke() -> None:
    """Every variant once on small CPU tensors, fzero checked against its reference."""
    numel = 10_007
    buffers = make_buffers(numel, "cpu")
    expected = {name: tensor.clone() for name, tensor in buffers.items()}
    decay = decay_table(numel, segments=20)
    step = torch.tensor(10.0)
    for _, function, _, _ in fzero_variants(buffers, decay).values():
        function()
    for grad in ("grad", "grad_bf16"):
        param_out = expected["param_out"] if grad == "grad_bf16" else None
        adamw_reference(
            expected["master"], expected[grad], expected["exp_avg"], expected["exp_avg_sq"],
            step=step, decay=decay, param_out=param_out, **HYPER,
        )  # fmt: skip
    for name in ("master", "exp_avg", "exp_avg_sq", "param_out"):
        torch.testing.assert_close(buffers[name], expected[name], rtol=0, atol=0)
    for _, function, _, _ in [*torch_variants(buffers).values(), copy_variant(numel, "cpu")["e"]]:
        function()
    print("cpu smoke: fzero variants match the reference; no timings on CPU")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run, no timings")
    parser.add_argument("--sweep", action="store_true", help="also time block shapes")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--json", help="write every measurement to this file")
    args = parser.parse_args()
    if args.cpu_smoke:
        main_cpu_smoke()
    else:
        main_cuda(tuple(int(s) for s in args.sizes.split(",")), args.sweep, args.json)
