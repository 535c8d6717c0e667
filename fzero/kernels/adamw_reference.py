"""The torch reference AdamW over one flat shard: the oracle the fused paths are tested against.

``adamw_reference`` is plain torch ops in the order of torch's ``_single_tensor_adam``, so that in
fp32 without ``grad_scale``/``found_inf`` it is bitwise equal to
``torch.optim.AdamW(foreach=False)``. ``reference_update`` is that update on one range of the
shard (the CPU paths run it chunk by chunk) and ``check_arguments`` the shape, dtype and device
checks every path runs first, from metadata only.

Low-precision moments: ``exp_avg``/``exp_avg_sq`` may be bf16 (math in fp32, rounded to nearest
when stored), cutting optimizer state from 8 to 4 bytes per element. Round-to-nearest drops any
change smaller than half a bf16 ulp (2**-9 relative): with ``beta2`` = 0.999 a stored
``exp_avg_sq`` can grow but never decay, since ``v * beta2`` rounds back to ``v``. Use it knowingly
(stochastic rounding would fix that; it is not done here).
"""

from __future__ import annotations

import torch

from fzero.kernels.weight_decay import WeightDecaySegments

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_arguments(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    decay: WeightDecaySegments,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
    param_out: torch.Tensor | None,
) -> None:
    """Shapes, dtypes and devices, from metadata only (no device sync)."""
    if master.dtype != torch.float32:
        raise TypeError(f"master must be float32, got {master.dtype}")
    if master.dim() != 1 or not master.is_contiguous():
        raise ValueError(f"master must be a contiguous 1-D shard, got shape {tuple(master.shape)}")
    numel = master.numel()
    streams = {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if param_out is not None:
        streams["param_out"] = param_out
    for name, tensor in streams.items():
        if tensor.shape != master.shape or not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous with master's shape {tuple(master.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.device != master.device:
            raise ValueError(f"{name} is on {tensor.device} but master is on {master.device}")
    if grad.dtype not in _GRAD_DTYPES:
        raise TypeError(f"grad must be one of {_GRAD_DTYPES}, got {grad.dtype}")
    if exp_avg.dtype not in _STATE_DTYPES or exp_avg_sq.dtype != exp_avg.dtype:
        raise TypeError(
            f"exp_avg and exp_avg_sq must share one dtype of {_STATE_DTYPES}, "
            f"got {exp_avg.dtype} and {exp_avg_sq.dtype}"
        )
    if param_out is not None and param_out.dtype not in _PARAM_OUT_DTYPES:
        raise TypeError(f"param_out must be one of {_PARAM_OUT_DTYPES}, got {param_out.dtype}")
    scalars = {"step": step, "grad_scale": grad_scale, "found_inf": found_inf}
    for name, tensor in scalars.items():
        if tensor is None:
            continue
        if tensor.numel() != 1 or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a one-element floating tensor, got {tensor}")
        if tensor.device != master.device:
            raise ValueError(f"{name} is on {tensor.device} but master is on {master.device}")
    if decay.numel != numel:
        raise ValueError(f"decay covers {decay.numel} elements but the shard has {numel}")


def reference_update(
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step_value: float,
    ranges: list[tuple[int, int, float]] | tuple[tuple[int, int, float], ...],
    grad_scale: torch.Tensor | None,
    bias_correction: bool = True,
) -> None:
    """One AdamW update in place, op for op as torch's ``_single_tensor_adam`` (non-capturable).
    ``bias_correction=False`` leaves out Adam's ``1 - beta**step`` divisors, as DeepSpeed's
    FusedAdam does with ``bias_correction: false`` (``csrc/adam/multi_tensor_adam.cu``)."""
    g = grad if grad.dtype == torch.float32 else grad.float()
    if grad_scale is not None:
        g = g * grad_scale
    for start, end, weight_decay in ranges:
        if weight_decay != 0:
            master[start:end].mul_(1 - lr * weight_decay)
    low_precision = exp_avg.dtype != torch.float32
    m = exp_avg.float() if low_precision else exp_avg
    v = exp_avg_sq.float() if low_precision else exp_avg_sq
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        bias_correction1 = 1 - beta1**step_value
        bias_correction2 = 1 - beta2**step_value
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        step_size = lr
        denom = v.sqrt().add_(eps)
    master.addcdiv_(m, denom, value=-step_size)
    if low_precision:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)


def adamw_reference(
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
    """The oracle for ``adamw_step``: whole-tensor torch ops, any device.

    Reads ``step`` on the host, as ``torch.optim.AdamW`` does when not capturable, which is what
    makes it bitwise equal to ``AdamW(foreach=False)``. A nonzero ``found_inf`` is applied with
    ``torch.where``, so the skip itself needs no host read.
    """
    check_arguments(
        master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
    )
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step_value": step.item()}
    hyper["bias_correction"] = bias_correction
    if found_inf is None:
        reference_update(
            master, grad, exp_avg, exp_avg_sq, ranges=decay.ranges, grad_scale=grad_scale, **hyper
        )
        if param_out is not None:
            param_out.copy_(master)
        return
    skip = found_inf != 0
    new_master, new_avg, new_avg_sq = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
    reference_update(
        new_master, grad, new_avg, new_avg_sq, ranges=decay.ranges, grad_scale=grad_scale, **hyper
    )
    if param_out is not None:
        param_out.copy_(torch.where(skip, param_out, new_master.to(param_out.dtype)))
    master.copy_(torch.where(skip, master, new_master))
    exp_avg.copy_(torch.where(skip, exp_avg, new_avg))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, new_avg_sq))
