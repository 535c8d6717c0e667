"""AdamW over one flat shard: the reference, the CPU path, and the dispatch to the CUDA kernel.

``adamw_step`` is what the training step calls. It updates a flat fp32 master shard and its two
moments in place, with weight decay given per range of the shard (biases and norms usually get
none), and can write the updated master straight into the low-precision copy the next all-gather
sends. On CUDA it runs one Triton launch (``adamw_triton.py``) that never waits on the host: the
step count, the gradient scale and the overflow flag are all read on the device.

``adamw_reference`` is the oracle: plain torch ops in the order of torch's ``_single_tensor_adam``,
so that in fp32 without ``grad_scale``/``found_inf`` it is bitwise equal to
``torch.optim.AdamW(foreach=False)``.

Low-precision moments: ``exp_avg``/``exp_avg_sq`` may be bf16 (math in fp32, rounded to nearest
when stored), cutting optimizer state from 8 to 4 bytes per element. Round-to-nearest drops any
change smaller than half a bf16 ulp (2**-9 relative): with ``beta2`` = 0.999 a stored
``exp_avg_sq`` can grow but never decay, since ``v * beta2`` rounds back to ``v``. Use it knowingly
(stochastic rounding would fix that; it is not done here).
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# Elements per chunk of the CPU path: small enough that a chunk of the four streams and the
# temporaries stays in L2, large enough that per-op overhead is small.
CPU_CHUNK_NUMEL = 1 << 16

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SegmentTable(NamedTuple):
    """The device-side form of ``WeightDecaySegments``: a kernel program finds the segment its
    first element lies in by bisecting ``segment_starts`` in ``search_steps`` steps, then walks
    forward over the segments that start inside its block.

    ``segment_starts`` ends with ``numel``, a sentinel no element reaches, so the walk needs no
    bound. The table grows with the number of segments (a few per parameter at most), not with
    the shard: a per-block table would cost 4 bytes per 1024 elements, megabytes for a billion
    parameters, held for the whole run.
    """

    segment_starts: torch.Tensor  # int64 [segments + 1]
    segment_decays: torch.Tensor  # float64 [segments]
    search_steps: int  # ceil(log2(segments)): bisection steps from [0, segments) to one


@dataclass(frozen=True)
class WeightDecaySegments:
    """Weight decay per range of a flat shard of ``numel`` elements.

    ``ranges`` holds ``(start, end, weight_decay)``: sorted, contiguous, non-empty, covering
    ``[0, numel)``, with neighbours of equal decay merged. Build it once per layout with
    ``from_ranges``; the device tables a kernel reads are built on first use and cached per device
    and block size, so steps after the first copy nothing to the device.
    """

    ranges: tuple[tuple[int, int, float], ...]
    numel: int
    _device_tables: dict[torch.device, SegmentTable] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _validate_ranges(self.ranges, self.numel)

    @classmethod
    def from_ranges(
        cls, ranges: tuple[tuple[int, int, float], ...] | list, numel: int
    ) -> WeightDecaySegments:
        """Validate ``ranges`` against ``[0, numel)``, drop empty ones and merge equal neighbours.

        Raises ``ValueError`` naming the offending range for gaps, overlaps, reversed ranges and
        negative or non-finite decay.
        """
        cleaned = [(int(start), int(end), float(decay)) for start, end, decay in ranges]
        for index, (start, end, decay) in enumerate(cleaned):
            if end < start:
                raise ValueError(
                    f"weight-decay range {index} {ranges[index]} ends before it starts"
                )
            if not (math.isfinite(decay) and decay >= 0):
                raise ValueError(
                    f"weight-decay range {index} {ranges[index]} has weight decay {decay}; "
                    "it must be finite and >= 0"
                )
        # Empty ranges (a parameter with no elements in this shard) carry no information.
        merged: list[tuple[int, int, float]] = []
        for start, end, decay in (r for r in cleaned if r[0] < r[1]):
            if merged and merged[-1][1] == start and merged[-1][2] == decay:
                merged[-1] = (merged[-1][0], end, decay)
            else:
                merged.append((start, end, decay))
        return cls(tuple(merged), int(numel))

    @classmethod
    def uniform(cls, numel: int, weight_decay: float) -> WeightDecaySegments:
        """One decay for the whole shard (no ranges at all for an empty one)."""
        return cls.from_ranges([(0, numel, weight_decay)] if numel else [], numel)

    def within(self, start: int, end: int) -> list[tuple[int, int, float]]:
        """The ranges clipped to ``[start, end)`` and shifted to start at 0."""
        first = bisect.bisect_right(self.ranges, start, key=lambda r: r[0]) - 1
        clipped = []
        for range_start, range_end, decay in self.ranges[max(first, 0) :]:
            if range_start >= end:
                break
            clipped.append((max(range_start, start) - start, min(range_end, end) - start, decay))
        return clipped

    def device_table(self, device: torch.device) -> SegmentTable:
        """The kernel's table on ``device``; built once, cached."""
        key = torch.device(device)
        table = self._device_tables.get(key)
        if table is None:
            starts = [r[0] for r in self.ranges] + [self.numel]
            table = SegmentTable(
                torch.tensor(starts, dtype=torch.int64, device=device),
                torch.tensor([r[2] for r in self.ranges], dtype=torch.float64, device=device),
                max(len(self.ranges) - 1, 0).bit_length(),
            )
            self._device_tables[key] = table
        return table


def _validate_ranges(ranges: tuple[tuple[int, int, float], ...], numel: int) -> None:
    if numel < 0:
        raise ValueError(f"a shard cannot have numel {numel}")
    expected_start = 0
    for index, (start, end, decay) in enumerate(ranges):
        where = f"weight-decay range {index} {(start, end, decay)}"
        if start > expected_start:
            raise ValueError(f"{where} leaves a gap [{expected_start}, {start}) with no decay")
        if start < expected_start:
            raise ValueError(
                f"{where} overlaps the range before it, which ends at {expected_start}"
            )
        if end <= start:
            raise ValueError(f"{where} is empty or reversed")
        if not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"{where} has weight decay {decay}; it must be finite and >= 0")
        expected_start = end
    if expected_start != numel:
        last = f"range {len(ranges) - 1} {ranges[-1]}" if ranges else "no range"
        raise ValueError(
            f"weight-decay ranges end at {expected_start} ({last}) but the shard has numel {numel}"
        )


def _check_arguments(
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


def _update(
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
    _check_arguments(
        master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
    )
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step_value": step.item()}
    hyper["bias_correction"] = bias_correction
    if found_inf is None:
        _update(
            master, grad, exp_avg, exp_avg_sq, ranges=decay.ranges, grad_scale=grad_scale, **hyper
        )
        if param_out is not None:
            param_out.copy_(master)
        return
    skip = found_inf != 0
    new_master, new_avg, new_avg_sq = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
    _update(
        new_master, grad, new_avg, new_avg_sq, ranges=decay.ranges, grad_scale=grad_scale, **hyper
    )
    if param_out is not None:
        param_out.copy_(torch.where(skip, param_out, new_master.to(param_out.dtype)))
    master.copy_(torch.where(skip, master, new_master))
    exp_avg.copy_(torch.where(skip, exp_avg, new_avg))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, new_avg_sq))


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
    _check_arguments(
        master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
    )
    if found_inf is not None and found_inf.item() != 0:
        return
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "step_value": step.item()}
    hyper["bias_correction"] = bias_correction
    for start in range(0, master.numel(), chunk_numel):
        end = min(start + chunk_numel, master.numel())
        chunk = slice(start, end)
        _update(
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
            _check_arguments(
                master, grad, exp_avg, exp_avg_sq, step, decay, grad_scale, found_inf, param_out
            )
            adamw_step_triton(master, grad, exp_avg, exp_avg_sq, **kwargs)
            return
    adamw_reference(master, grad, exp_avg, exp_avg_sq, **kwargs)
