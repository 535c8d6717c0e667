"""ZeroState: the training state, a pytree of flat sharded buffers plus static structure.

The leaves are all of training progress: this rank's buffers (fp32 master shard, AdamW
moments, the optimizer's step count, and the compute-dtype parameter shards when they are not
the master itself), ``pending`` (an update decided by the last step and applied in the next
one's forward, under optimizer offload at stage 3: ``fzero/state/pending.py``) and
``progress`` (steps, skipped steps, the loss scaler's position; the learning-rate schedule
reads the applied-step count). Everything static (layout, schedule,
config, the model and the runtime that drives it) is the pytree's metadata, so
``optree.tree_map(f, state, namespace="fzero")`` touches exactly the tensors a checkpoint must
hold, and a ``tree_map`` copy of a state is a state: ``train_step`` accepts it and trains from it.

Under partial optimizer offload (``offload_optimizer.ratio`` < 1) ``master``, ``exp_avg`` and
``exp_avg_sq`` are ``SplitFlat`` buffers (``fzero/state/split.py``): the device units' part and
the host units' part, two leaves each, never one partial tensor. ``split.full()`` (or
``fzero.state.split.as_flat``) is the whole flat buffer, the one a checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optree
import torch

from fzero.errors import DonatedStateError
from fzero.state.pending import PendingUpdate
from fzero.state.progress import Progress
from fzero.state.split import SplitFlat


@dataclass(frozen=True, eq=False)
class ZeroState:
    # This rank's optimizer space, fp32; SplitFlat (a device and a host part) under partial
    # optimizer offload.
    master: torch.Tensor | SplitFlat
    exp_avg: torch.Tensor | SplitFlat
    exp_avg_sq: torch.Tensor | SplitFlat
    step: torch.Tensor  # 0-dim fp32: optimizer updates applied so far
    # Per unit, this rank's compute-dtype slice (views into the workspace); empty when those
    # are the fp32 master itself (fp32 stages 0 and 3 with no frozen parameters).
    param_shards: tuple[torch.Tensor, ...]
    pending: PendingUpdate
    progress: Progress
    runtime: Any  # fzero.runtime.Runtime: static, never a leaf

    @property
    def schedule(self):
        return self.runtime.executor.schedule

    @property
    def device(self) -> torch.device:
        """Where this rank computes: the GPU even when offload keeps ``master`` on the host."""
        return self.runtime.executor.workspace.device

    @property
    def layout(self):
        return self.runtime.layout

    @property
    def config(self):
        return self.runtime.config

    @property
    def model(self):
        return self.runtime.model

    @property
    def rank(self) -> int:
        return self.runtime.comm.rank

    @property
    def world_size(self) -> int:
        return self.runtime.comm.world_size

    def __repr__(self) -> str:
        # Never print buffer contents: stage 3 frees storages between uses, and a summary is
        # what a reader wants anyway.
        def describe(t: torch.Tensor | SplitFlat) -> str:
            text = f"{t.numel():,} x {str(t.dtype).removeprefix('torch.')}"
            if isinstance(t, SplitFlat):
                text += f" ({t.split_numel:,} on the device, {t.on_host.numel():,} on the host)"
            elif t.untyped_storage().filename:  # NVMe offload
                text += " in a file"
            return text

        return (
            f"ZeroState(stage {self.runtime.config.stage}, rank {self.rank}/{self.world_size}, "
            f"step {self.progress.step_count}, master {describe(self.master)}, "
            f"moments 2 x {describe(self.exp_avg)}, {len(self.param_shards)} parameter shards)"
        )

    def check_live(self) -> None:
        if self.runtime.is_donated(self):
            raise DonatedStateError(
                "this state was donated to fzero.train_step, which may have changed its buffers "
                "in place; use the state train_step returned"
            )


LEAF_NAMES = (
    "master",
    "exp_avg",
    "exp_avg_sq",
    "step",
    "param_shards",
    "pending",
    "progress",
)


def _flatten(state: ZeroState):
    return tuple(getattr(state, n) for n in LEAF_NAMES), state.runtime, LEAF_NAMES


def _unflatten(runtime: Any, children: Any) -> ZeroState:
    return ZeroState(*children, runtime=runtime)


# optree asks every library for its own namespace: ``optree.tree_map(f, state, namespace="fzero")``.
NAMESPACE = "fzero"
optree.register_pytree_node(ZeroState, _flatten, _unflatten, namespace=NAMESPACE)
