"""The CUDA path of ``adamw_step``: one Triton launch over a whole flat shard.

Each program owns ``BLOCK_NUMEL`` consecutive elements and touches each stream once: it reads
master, grad, exp_avg and exp_avg_sq and writes master, exp_avg, exp_avg_sq and param_out. With
fp32 grad and state and no param_out that is 28 bytes per element, the least any AdamW can move;
bf16 grad plus bf16 param_out is 28 too (2 bytes fewer read, 2 more written).

Weight decay per range needs no split launch: each program bisects the segment starts
(``SegmentTable``, a few entries per parameter) for the segment of its first element, and a
block that straddles a boundary picks each element's decay with a ``where`` per extra segment.
The step count, ``grad_scale`` and ``found_inf`` are read on the device, so a step never waits
on the host and can be captured in a CUDA graph.

Imported lazily by ``adamw.py``, so CPU-only installs need no triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fzero.kernels.weight_decay import WeightDecaySegments

# 1024 elements over 4 warps: 8 elements (two 16-byte vectors per fp32 stream) per thread, ~100
# registers, so several programs share an SM. `benchmarks/adamw.py --sweep` on an H100: 512 or
# 1024 elements at 4 or 8 warps reach 0.97 of copy bandwidth; 2048 falls to 0.93, 4096 to 0.85.
BLOCK_NUMEL = 1024
NUM_WARPS = 4


@triton.jit
def _update_block(
    block,
    offsets,
    mask,
    master_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    param_out_ptr,
    step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    segment_starts_ptr,
    segment_decays_ptr,
    num_segments,
    search_steps,
    block_start,
    block_end,
    lr,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_PARAM_OUT: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
):
    """AdamW on one block, in fp32, in the op order of torch's single-tensor AdamW."""
    # The four streams are loaded first so that their latency hides the scalar work below. They
    # are read even on a skipped step: skips are rare, and waiting for found_inf first is not.
    p = tl.load(master_ptr + offsets, mask=mask, eviction_policy="evict_first")
    g = tl.load(grad_ptr + offsets, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, eviction_policy="evict_first").to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, eviction_policy="evict_first").to(tl.float32)

    # Bias corrections in float64: in float32, 1 - beta2**step keeps few digits at small steps.
    # beta = 1 - (1 - beta) is exact in float64, and 1 - beta is what float32 holds accurately.
    lr64 = tl.cast(lr, tl.float64)
    if BIAS_CORRECTION:
        step = tl.load(step_ptr).to(tl.float64)
        beta1_power = tl.exp(step * tl.log(1.0 - tl.cast(one_minus_beta1, tl.float64)))
        beta2_power = tl.exp(step * tl.log(1.0 - tl.cast(one_minus_beta2, tl.float64)))
        step_size = (lr64 / (1.0 - beta1_power)).to(tl.float32)
        bias_correction2_sqrt = tl.sqrt(1.0 - beta2_power).to(tl.float32)
    else:  # FusedAdam's bias_correction: false
        step_size = lr64.to(tl.float32)
        bias_correction2_sqrt = tl.full([], 1.0, tl.float32)

    if HAS_GRAD_SCALE:
        g = g * tl.load(grad_scale_ptr).to(tl.float32)

    # Decoupled weight decay, one factor per segment; most blocks lie inside one segment. The
    # segment of the block's first element: bisect [low, high), keeping
    # starts[low] <= block_start < starts[high] (starts[num_segments] is the shard's end).
    low = tl.full([], 0, tl.int32)
    high = tl.full([], 0, tl.int32) + num_segments
    for _ in range(search_steps):
        middle = (low + high) // 2
        below = tl.load(segment_starts_ptr + middle) <= block_start
        low = tl.where(below, middle, low)
        high = tl.where(below, high, middle)
    decayed = p * (1.0 - lr64 * tl.load(segment_decays_ptr + low)).to(tl.float32)
    # Later segments that start inside the block; the sentinel start ends the walk.
    segment = low + 1
    segment_start = tl.load(segment_starts_ptr + segment)
    while segment_start < block_end:
        segment_factor = (1.0 - lr64 * tl.load(segment_decays_ptr + segment)).to(tl.float32)
        decayed = tl.where(offsets >= segment_start, p * segment_factor, decayed)
        segment += 1
        segment_start = tl.load(segment_starts_ptr + segment)
    p = decayed

    # torch.lerp picks its formula by the weight to stay exact at both ends.
    difference = g - m
    m = tl.where(
        one_minus_beta1 < 0.5,
        m + one_minus_beta1 * difference,
        g - difference * (1.0 - one_minus_beta1),
    )
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    if HAS_FOUND_INF:
        # Compared as a block: Triton's interpreter cannot `&` a broadcast scalar comparison.
        mask = mask & (tl.full(p.shape, 0.0, tl.float32) == tl.load(found_inf_ptr).to(tl.float32))
    tl.store(master_ptr + offsets, p, mask=mask)
    tl.store(exp_avg_ptr + offsets, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    if HAS_PARAM_OUT:
        tl.store(param_out_ptr + offsets, p.to(param_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    master_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    param_out_ptr,
    step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    segment_starts_ptr,
    segment_decays_ptr,
    num_segments,
    search_steps,
    numel,
    lr,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_PARAM_OUT: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr,
    BLOCK_NUMEL: tl.constexpr,
):
    block = tl.program_id(0)
    block_start = block.to(tl.int64) * BLOCK_NUMEL
    block_end = tl.minimum(block_start + BLOCK_NUMEL, numel)
    # Rows of 4 elements, each row held by one thread: fp32 streams then move in 16-byte and bf16
    # streams in 8-byte accesses under one register layout. A flat range would give bf16 streams 8
    # elements per thread and fp32 streams 4, and Triton would shuffle between the two layouts
    # through shared memory.
    rows = tl.arange(0, BLOCK_NUMEL // 4)[:, None] * 4
    offsets = block_start + (rows + tl.arange(0, 4)[None, :])
    # Full blocks get an all-true mask, which keeps their accesses vectorised: `offsets < numel`
    # is provably constant over a row only when numel is a multiple of 16. The two calls are the
    # same code; a mask chosen by an `if` and used after it would lose that proof.
    if block_start + BLOCK_NUMEL > numel:
        _update_block(
            block, offsets, offsets < numel, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
            param_out_ptr, step_ptr, grad_scale_ptr, found_inf_ptr, segment_starts_ptr,
            segment_decays_ptr, num_segments, search_steps, block_start, block_end, lr, beta2,
            one_minus_beta1, one_minus_beta2, eps, HAS_GRAD_SCALE, HAS_FOUND_INF, HAS_PARAM_OUT,
            BIAS_CORRECTION,
        )  # fmt: skip
    else:
        _update_block(
            block, offsets, tl.full([BLOCK_NUMEL // 4, 4], 1, tl.int1), master_ptr, grad_ptr,
            exp_avg_ptr, exp_avg_sq_ptr, param_out_ptr, step_ptr, grad_scale_ptr, found_inf_ptr,
            segment_starts_ptr, segment_decays_ptr, num_segments, search_steps, block_start,
            block_end, lr, beta2, one_minus_beta1, one_minus_beta2, eps, HAS_GRAD_SCALE,
            HAS_FOUND_INF, HAS_PARAM_OUT, BIAS_CORRECTION,
        )  # fmt: skip


def adamw_step_triton(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: torch.Tensor,
    decay: WeightDecaySegments,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    param_out: torch.Tensor | None = None,
    bias_correction: bool = True,
    block_numel: int = BLOCK_NUMEL,
    num_warps: int = NUM_WARPS,
) -> None:
    """Launch the kernel; arguments as ``adamw_step`` (which checks them), plus the block shape.

    Absent optional tensors are replaced by ``master``/``step`` as placeholders the kernel never
    reads (their flags are compile-time constants).
    """
    numel = master.numel()
    if numel == 0:
        return
    table = decay.device_table(master.device)
    grid = (triton.cdiv(numel, block_numel),)
    _adamw_kernel[grid](
        master,
        grad,
        exp_avg,
        exp_avg_sq,
        master if param_out is None else param_out,
        step,
        step if grad_scale is None else grad_scale,
        step if found_inf is None else found_inf,
        table.segment_starts,
        table.segment_decays,
        len(decay.ranges),
        table.search_steps,
        numel,
        float(lr),
        float(beta2),
        float(1 - beta1),
        float(1 - beta2),
        float(eps),
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_PARAM_OUT=param_out is not None,
        BIAS_CORRECTION=bool(bias_correction),
        BLOCK_NUMEL=block_numel,
        num_warps=num_warps,
    )
