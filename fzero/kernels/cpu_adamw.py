"""AdamW over a flat shard in host memory, with the cast into a compute-dtype copy folded in.

Not on the step's path: the offload step (``fzero/offload/optimizer.py``) calls torch's fused CPU
kernel directly and casts on the device, which ``benchmarks/cpu_adamw.py`` measured faster; this
kernel stays for host steps that must write a compute-dtype copy on the host.

``cpu_adamw_step`` takes the arguments of ``adamw_step`` (``fzero/kernels/adamw.py``) and
computes the same update with torch's fused CPU AdamW kernel (``torch._fused_adamw_``), which
reads and writes every element once across torch's intra-op threads. That kernel wants fp32
everywhere and knows one weight decay and no output cast, so the shard is walked in chunks that
fit a server's last-level cache: a chunk's gradient is widened to fp32 and multiplied by
``grad_scale`` into a scratch buffer, bf16 moments are widened beside it, one kernel call
updates the chunk (a chunk inside one decay range passes that decay to the kernel; in a chunk
spanning several, the decayed ranges of the master are first multiplied by
``1 - lr * weight_decay``, the very operation the kernel and the reference do first, and the
call runs undecayed), and the chunk's new master is cast into ``param_out`` while still in
cache. Scale, decay table and cast so cost no extra pass over host memory.

Parity with ``adamw_reference``: the moments are bitwise equal. The master differs only in the
update's rounding, because the kernel computes ``master + (-step_size * exp_avg) / denom``
where the reference computes ``master + -step_size * (exp_avg / denom)``: by at most
``2**-22 * |update|`` plus one ulp per step, which is one ulp on a few elements in 1e5 at
training learning rates (``tests/test_cpu_adamw.py`` measures both). Bias
correction is always applied, as in ``adamw_step`` (the config rejects turning it off).
"""

from __future__ import annotations

import torch

from fzero.kernels.adamw_reference import check_arguments, reference_update
from fzero.kernels.weight_decay import WeightDecaySegments

# Elements per chunk. Every torch op on a chunk is one parallel region of the intra-op threads,
# and a region ends at a barrier that waits for its slowest thread: on a host whose cores are
# also busy with other work (the training loop, swap threads), a preempted thread stalls the
# barrier for a scheduler time slice, so many small chunks can run tens of times slower than
# few large ones (2**18-element chunks on 2 loaded cores: 0.1 GB/s, against 4.6 for torch's
# one region). 2**24 elements (a 350 MB working set, within a server's L3) keeps a shard of a
# billion elements to about 60 chunks; on 16 idle cores chunks of 2**20 to 2**24 elements all
# measured 80-97 GB/s, against 106-122 for torch's kernel alone on fp32 with no scale.
DEFAULT_CHUNK_NUMEL = 1 << 24
# torch's kernel splits work in cache lines of 16 fp32 elements and runs its vector loop (8 or
# 16 lanes) over whole ones: a range that is a multiple of 16 long never reaches its scalar loop.
VECTOR_NUMEL = 16


def cpu_adamw_step(
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
    chunk_numel: int | None = None,
) -> None:
    """One AdamW update of a host shard, in place; ``adamw_step``'s arguments and meaning.

    ``master`` (fp32), ``exp_avg`` and ``exp_avg_sq`` (fp32 or bf16) are updated in place;
    ``grad`` (fp32/bf16/fp16) is read only and multiplied by ``grad_scale`` (the averaging,
    loss-scale and clipping factor, a one-element CPU tensor) first. ``step`` is the 1-based
    count of this update. A nonzero ``found_inf`` skips the update and touches nothing.
    ``param_out`` (e.g. a pinned bf16 staging buffer for the upload) receives the new master in
    its dtype. Every tensor must be on the CPU. Runs on the calling thread; torch releases the
    GIL inside its kernels, so a caller may run it on a worker thread to overlap other work.
    """
    check_arguments(
        master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
    )
    if master.device.type != "cpu":
        raise ValueError(
            f"cpu_adamw_step runs on host tensors, got master on {master.device}; "
            "use fzero.kernels.adamw_step for device shards"
        )
    if found_inf is not None and found_inf.item() != 0:
        return
    numel = master.numel()
    if chunk_numel is None:
        chunk_numel = DEFAULT_CHUNK_NUMEL
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel must be at least 1, got {chunk_numel}")
    widen_moments = exp_avg.dtype != torch.float32
    stage_grad = grad.dtype != torch.float32 or grad_scale is not None
    scratch_numel = min(chunk_numel, numel)
    grad_scratch = torch.empty(scratch_numel) if stage_grad else None
    avg_scratch = torch.empty(scratch_numel) if widen_moments else None
    avg_sq_scratch = torch.empty(scratch_numel) if widen_moments else None
    # torch's kernel reads the step count from a float tensor.
    step_count = torch.tensor(float(step.item()))
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}
    for start in range(0, numel, chunk_numel):
        end = min(start + chunk_numel, numel)
        length = end - start
        g = grad[start:end]
        if grad_scratch is not None:
            if g.dtype == torch.float32 and grad_scale is not None:  # one pass, same rounding
                g = torch.mul(g, grad_scale, out=grad_scratch[:length])
            else:
                g = grad_scratch[:length].copy_(g)
                if grad_scale is not None:
                    g.mul_(grad_scale)
        m, v = exp_avg[start:end], exp_avg_sq[start:end]
        if avg_scratch is not None and avg_sq_scratch is not None:
            m = avg_scratch[:length].copy_(m)
            v = avg_sq_scratch[:length].copy_(v)
        p = master[start:end]
        ranges = decay.within(start, end)
        chunk_decay = ranges[0][2] if len(ranges) == 1 else 0.0
        if len(ranges) > 1:
            # Decoupled decay first, by range, as the reference and torch's kernel both do it;
            # then one undecayed kernel call covers the chunk whatever its ranges.
            for range_start, range_end, weight_decay in ranges:
                if weight_decay != 0:
                    p[range_start:range_end].mul_(1 - lr * weight_decay)
        _fused_chunk(p, g, m, v, step_count, chunk_decay, **hyper)
        if widen_moments:
            exp_avg[start:end].copy_(m)
            exp_avg_sq[start:end].copy_(v)
        if param_out is not None:
            param_out[start:end].copy_(p)


def _fused_chunk(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    weight_decay: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """torch's kernel, with one ``weight_decay``, over the vector-aligned bulk; the last
    ``numel % VECTOR_NUMEL`` elements take the reference's ops.

    torch's kernel runs its scalar loop on that tail, whose moment update is not the fused
    multiply-add its vector loop and ``torch.lerp`` use; handing it to the reference keeps the
    moments bitwise. Chunks of a multiple of ``VECTOR_NUMEL`` elements leave a tail only at the
    shard's end.
    """
    numel = master.numel()
    bulk = numel // VECTOR_NUMEL * VECTOR_NUMEL
    if bulk:
        torch._fused_adamw_(
            [master[:bulk]],
            [grad[:bulk]],
            [exp_avg[:bulk]],
            [exp_avg_sq[:bulk]],
            [],
            [step],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )
    if bulk < numel:
        tail = slice(bulk, numel)
        reference_update(
            master[tail], grad[tail], exp_avg[tail], exp_avg_sq[tail], lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, step_value=float(step.item()),
            ranges=((0, numel - bulk, weight_decay),), grad_scale=None,
        )  # fmt: skip
