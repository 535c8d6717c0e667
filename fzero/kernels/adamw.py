"""AdamW over one flat shard: ``adamw_step``, which picks the path for the shard's device.

``adamw_step`` is what the training step calls. It updates a flat fp32 master shard and its two
moments in place, with weight decay given per range of the shard (``weight_decay.py``), and can
write the updated master straight into the low-precision copy the next all-gather sends. On CUDA
it runs one Triton launch (``adamw_triton.py``) that never waits on the host: the step count, the
gradient scale and the overflow flag are all read on the device. On the CPU it runs
``adamw_step_cpu``, the reference's ops chunk by chunk; elsewhere, or without triton, the torch
reference itself (``adamw_reference.py``, also the oracle of the tests).
"""

from __future__ import annotations

import warnings

import torch

from fzero.kernels.adamw_reference import adamw_reference, check_arguments, reference_update
from fzero.kernels.weight_decay import WeightDecaySegments

# Elements per chunk of the CPU path: small enough that a chunk of the four streams and the
# temporaries stays in L2, large enough that per-op overhead is small.
CPU_CHUNK_NUMEL = 1 << 16


def adamw_step_cpu(
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
    chunk_numel: int = CPU_CHUNK_NUMEL,
    bias_correction: bool = True,
) -> None:
    """The reference's ops run chunk by chunk, so temporaries stay in cache and stay small.

    Elementwise ops do not care where a chunk starts, so this is bitwise equal to
    ``adamw_reference``. On the CPU, reading ``found_inf`` and ``step`` costs no device sync, so
    a skipped step returns before touching anything.
    """
    check_arguments(
        master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
    )
    if found_inf is not None and found_inf.item() != 0:
        return
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step_value": step.item()}
    hyper["bias_correction"] = bias_correction
    for start in range(0, master.numel(), chunk_numel):
        end = min(start + chunk_numel, master.numel())
        chunk = slice(start, end)
        reference_update(
            master[chunk],
            grad[chunk],
            exp_avg[chunk],
            exp_avg_sq[chunk],
            ranges=decay.within(start, end),
            grad_scale=grad_scale,
            **hyper,
        )
        if param_out is not None:
            param_out[chunk].copy_(master[chunk])


def adamw_step(
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
) -> None:
    """One AdamW update of a flat shard, in place; same math as ``torch.optim.AdamW``.

    ``master`` (fp32), ``exp_avg`` and ``exp_avg_sq`` (fp32, or bf16 for 4 instead of 8 bytes of
    state per element) are updated in place; ``grad`` (fp32/bf16/fp16) is read only and multiplied
    by ``grad_scale`` first. ``step`` is the 1-based count of this update, already incremented by
    the caller. A nonzero ``found_inf`` skips the update entirely. ``param_out``, if given, receives
    the new master cast to its dtype. On CUDA this is one kernel launch and no host sync; on the CPU
    it is ``adamw_step_cpu``. ``bias_correction=False``: no ``1 - beta**step`` divisors.
    """
    kwargs = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "step": step,
        "decay": decay,
        "grad_scale": grad_scale,
        "found_inf": found_inf,
        "param_out": param_out,
        "bias_correction": bias_correction,
    }
    if master.device.type == "cpu":
        adamw_step_cpu(master, grad, exp_avg, exp_avg_sq, **kwargs)
        return
    if master.device.type == "cuda":
        try:
            from fzero.kernels.adamw_triton import adamw_step_triton
        except ImportError:
            warnings.warn(
                "triton is not installed: adamw_step falls back to the torch reference, which is "
                "slower and reads the step count on the host",
                stacklevel=2,
            )
        else:
            check_arguments(
                master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
            )
            adamw_step_triton(master, grad, exp_avg, exp_avg_sq, **kwargs)
            return
    adamw_reference(master, grad, exp_avg, exp_avg_sq, **kwargs)
