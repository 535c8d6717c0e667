"""The one table from op type to handler: which component method runs each op of a schedule.

Gathers (``gathers.py``), gradient reduction (``reductions.py``), the step phase
(``step_phase.py``) and, under optimizer offload, the host optimizer
(``fzero/offload/optimizer.py``) each own the state their ops touch; the executor looks every op
up here. No handler asks which ZeRO stage it is in: the compiler emits a different op where
behaviour differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fzero.errors import ScheduleError
from fzero.schedule import ops as O


def handler_table(
    gathers: Any, reduction: Any, step_phase: Any, host_optimizer: Any
) -> dict[type[O.Op], Callable[[Any], None]]:
    """Every op type's handler, bound to the executor's components (``host_optimizer`` None:
    offload's ops are refused)."""
    g, r, s = gathers, reduction, step_phase
    h = host_optimizer or _NoHostOptimizer()
    return {
        O.AllGather: g.all_gather,
        O.UploadShard: g.upload_shard,
        O.WaitGather: g.wait_gather,
        O.Release: g.release,
        O.ZeroGrad: r.zero_grad,
        O.DropGrads: r.drop_grads,
        O.AllocGrad: r.alloc_grad,
        O.ReduceScatter: r.reduce_scatter,
        O.WriteGradShard: r.write_grad_shard,
        O.AllReduce: r.all_reduce,
        O.ReduceInOrder: r.reduce_in_order,
        O.WaitReduce: r.wait_reduce,
        O.AllocGradShard: r.alloc_grad_shard,
        O.ZeroGradShard: r.zero_grad_shard,
        O.FreeGradShard: r.free_grad_shard,
        O.AllocUnitGrad: r.alloc_unit_grad,
        O.FreeGradBuffer: r.free_grad_buffer,
        O.AccumulateGradNorm: s.accumulate_grad_norm,
        O.ReduceScalars: s.reduce_scalars,
        O.ReduceScalarsInOrder: s.reduce_scalars_in_order,
        O.OptimizerStep: s.optimizer_step,
        O.CopyGradToHost: h.copy_grad_to_host,
        O.GradFromHost: h.grad_from_host,
        O.ScalarsToHost: h.scalars_to_host,
        O.HostOptimizerStep: h.host_optimizer_step,
        O.CopyParamsToDevice: h.copy_params_to_device,
        O.CopyParamsToHost: h.copy_params_to_host,
        O.WaitUploads: h.wait_uploads,
        O.ApplyPendingUpdate: h.apply_pending_update,
        O.UploadUpdate: h.upload_update,
        O.ReadStateFromFile: h.read_state_from_file,
        O.WriteStateToFile: h.write_state_to_file,
        O.ReadShardFromFile: h.read_shard_from_file,
        O.WaitFileWrites: h.wait_file_writes,
    }


class _NoHostOptimizer:
    """Stands for the host optimizer where the optimizer is not offloaded: a schedule with
    offload ops cannot run here."""

    def __getattr__(self, name: str) -> Callable:
        def refuse(op: O.Op) -> None:
            raise ScheduleError(
                f"{op} needs optimizer offload, which this model was not built with"
            )

        return refuse
