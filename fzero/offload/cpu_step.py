"""The CPU AdamW step of one unit: torch's fused CPU kernel over the unit's flat host ranges.

``torch._fused_adamw_`` reads and writes each element once across torch's intra-op threads (28
bytes per element: master, both moments and the gradient read, the three states written);
``benchmarks/cpu_adamw.py`` measures it against DeepSpeed's CPU Adam and fzero's own
``fzero/kernels/cpu_adamw.py``. The step's one factor (averaging over ranks, undoing the loss
scale, clipping) is its ``grad_scale`` (the gradient is divided by it), so no pass over the
gradient is added. A unit's range is cut where the weight decay changes, and each decay's ranges
go to the kernel in one call.
"""

from __future__ import annotations

import torch

from fzero.kernels import WeightDecaySegments
from fzero.state.layout import FlatLayout


class CpuAdamW:
    """Steps one unit at a time; keeps the weight-decay runs of every unit and one fp32 buffer
    that a narrower host gradient is widened into."""

    def __init__(self, layout: FlatLayout, decay_ranges: tuple[tuple[int, int, float], ...]):
        self.layout = layout
        # Per unit, its optimizer range cut where the weight decay changes, relative to the
        # unit's start, grouped by decay: decay -> slices.
        decay = WeightDecaySegments.from_ranges(decay_ranges, layout.optimizer_numel)
        self.runs: dict[int, dict[float, list[slice]]] = {}
        for u in layout.units:
            lo, hi = u.optimizer_offset, u.optimizer_offset + u.optimizer_numel
            if u.optimizer_numel:
                by_decay: dict[float, list[slice]] = {}
                for a, b, d in decay.within(lo, hi):
                    by_decay.setdefault(d, []).append(slice(a, b))
                self.runs[u.index] = by_decay
        self._fp32_grad: torch.Tensor | None = None  # see _widened

    def step(
        self,
        unit: int,
        states: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        grad: torch.Tensor,
        step: torch.Tensor,
        hyper,
        lr: float,
        inverse_scale: torch.Tensor,
    ) -> None:
        """AdamW over unit ``unit``: ``states`` are its master and moments (flat fp32 views of
        the unit's optimizer range), ``grad`` its gradient (any float dtype), divided by
        ``inverse_scale``; ``step`` the optimizer's step count (0-dim, already counted)."""
        master, exp_avg, exp_avg_sq = states
        if grad.dtype != torch.float32:  # torch's kernel wants one dtype throughout
            grad = self._widened(grad)
        for decay, spans in self.runs[unit].items():
            torch._fused_adamw_(
                [master[s] for s in spans],
                [grad[s] for s in spans],
                [exp_avg[s] for s in spans],
                [exp_avg_sq[s] for s in spans],
                [],
                [step] * len(spans),
                lr=lr,
                beta1=hyper.beta1,
                beta2=hyper.beta2,
                weight_decay=decay,
                eps=hyper.eps,
                amsgrad=False,
                maximize=False,
                grad_scale=inverse_scale,
                found_inf=None,
            )

    def _widened(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` (a unit's bf16 or fp16 host gradient) in fp32, in one buffer kept for every
        unit: a fresh one per unit would make the host allocator map and fault in a unit's worth
        of pages each time (large blocks come from mmap)."""
        if self._fp32_grad is None or self._fp32_grad.numel() < grad.numel():
            largest = max(u.optimizer_numel for u in self.layout.units)
            self._fp32_grad = torch.empty(max(largest, grad.numel()), dtype=torch.float32)
        return self._fp32_grad[: grad.numel()].copy_(grad)
