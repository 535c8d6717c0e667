"""``Engine``: DeepSpeed's imperative training loop over fzero's functional step.

    engine, optimizer, _, _ = fzero.initialize(model=model, config=ds_config)
    for batch in dataloader:
        outputs = engine(inputs, labels=labels)   # one micro-batch's forward
        engine.backward(outputs.loss)             # its backward and gradient collectives
        engine.step()                             # AdamW at the accumulation boundary

Each call is one of ``fzero.train``'s pieces: ``engine(...)`` arms a micro-step
(``begin_micro_step``) and runs the model, ``backward`` is ``fzero.train.backward`` with the
accumulation count, and ``step`` runs ``apply_step`` every ``gradient_accumulation_steps``
micro-batches and does nothing in between (DeepSpeed's boundary rule). So k engine
micro-batches train exactly as ``train_step(state, [b1, ..., bk])``. The engine holds the
current ``ZeroState`` (``engine.state``); the counters are DeepSpeed's (``global_steps``,
``micro_steps``, ``global_samples``).
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fzero import train
from fzero.errors import EngineError
from fzero.state.zero_state import ZeroState

CLIENT_STATE_KEY = "client_state"
COUNTERS_KEY = "engine"


class Phase(enum.Enum):
    """Where the engine is within one micro-batch."""

    IDLE = "idle"  # before the micro-batch's forward
    FORWARD = "forward"  # forward ran with the micro-step armed; backward is next
    BACKWARD = "backward"  # backward ran; step() is next


class Engine:
    """The object ``fzero.initialize`` returns; see the module docstring."""

    def __init__(self, state: ZeroState, local_rank: int):
        self.state = state
        self._local_rank = local_rank
        self.phase = Phase.IDLE
        self.global_steps = 0  # optimizer steps run (skipped fp16 steps included)
        self.micro_steps = 0  # micro-batches stepped
        self.global_samples = 0  # samples seen by all ranks
        self.metrics: dict[str, Any] = {}  # the last optimizer step's (see fzero.train_step)
        self._window = 0  # micro-batches backpropagated since the last optimizer step
        self._boundary: bool | None = None  # set_gradient_accumulation_boundary's override

    # -- what DeepSpeed's engine exposes -----------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The user's model (its parameters are views into fzero's buffers)."""
        return self.state.runtime.model

    @property
    def config(self) -> Any:
        """The resolved ``fzero.Config``."""
        return self.state.runtime.config

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def local_rank(self) -> int | torch.device:
        """This process's GPU index (``LOCAL_RANK``), so ``tensor.to(engine.local_rank)`` moves a
        batch to it, as in DeepSpeed. On CPU it is the CPU device itself, so that same line keeps
        working there (an int would mean a CUDA device); use ``global_rank`` for comparisons."""
        return self._local_rank if self.device.type == "cuda" else self.device

    @property
    def global_rank(self) -> int:
        return self.state.runtime.comm.rank

    @property
    def world_size(self) -> int:
        return self.state.runtime.comm.world_size

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps or 1

    @property
    def train_micro_batch_size_per_gpu(self) -> int | None:
        return self.config.train_micro_batch_size_per_gpu

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-batch is the last before the optimizer step: every
        ``gradient_accumulation_steps``-th, unless ``set_gradient_accumulation_boundary`` said."""
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Say whether the current micro-batch ends the accumulation window (as DeepSpeed's method
        of that name does), say for a shorter last window of an epoch; call it before the
        forward. It holds until the next ``step()``, which then averages the window's count."""
        if self.phase is not Phase.IDLE:
            raise EngineError(
                "set_gradient_accumulation_boundary() must come before the micro-batch's forward"
            )
        self._boundary = bool(is_boundary)

    def get_lr(self) -> list[float]:
        """The learning rate the next optimizer step uses (one per group, as DeepSpeed)."""
        return [self.config.lr_at(self.state.progress.applied_steps)]

    def get_global_grad_norm(self) -> float | None:
        """The last step's gradient norm (unscaled, before clipping), None before a step."""
        norm = self.metrics.get("grad_norm")
        return None if norm is None else float(norm)

    def get_loss_scale(self) -> float:
        return float(self.state.progress.loss_scale)

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches backpropagated since the last optimizer step."""
        return self._window

    @property
    def skipped_steps(self) -> int:
        return int(self.state.progress.skipped_count)

    def train(self, mode: bool = True) -> Engine:
        self.module.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do, accepted for DeepSpeed's loops: fzero's gradients live in its own
        buffers, which each optimizer step consumes and resets."""

    # -- the loop ----------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model on one micro-batch. With gradients enabled this arms a micro-step, so
        ``backward(loss)`` must follow; under ``torch.no_grad()`` (evaluation) it is a plain
        forward (stage 3 gathers each unit for its forward and frees it after)."""
        self._check_idle()
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        self.arm()
        try:
            return self.module(*args, **kwargs)
        except BaseException:
            self.abort()
            raise

    def arm(self) -> None:
        """Arm a training micro-step for a forward the caller runs itself on ``engine.module``
        (as the fzero Trainer's ``compute_loss`` does); ``backward(loss)`` must follow."""
        self._check_idle()
        train.begin_micro_step(self.state, last=self.is_gradient_accumulation_boundary())
        self.phase = Phase.FORWARD

    def abort(self) -> None:
        """Drop the current micro-batch after an error in its forward or backward: the hooks are
        disarmed and its partial gradients dropped; the window's earlier micro-batches too."""
        train.abort_micro_steps(self.state)
        self.phase = Phase.IDLE
        self._window = 0

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of this micro-batch's loss, divided by ``gradient_accumulation_steps`` (not
        with ``scale_wrt_gas=False``: the caller scaled it, as the HF Trainer does) and scaled by
        the fp16 loss scale, with the gradient collectives. Returns ``loss``."""
        if self.phase is not Phase.FORWARD:
            raise EngineError(
                "engine.backward(loss) needs the loss of a forward through the engine "
                "(outputs = engine(batch), with gradients enabled) since the last step()"
                if self.phase is Phase.IDLE
                else "engine.backward(loss) was called twice for one micro-batch; call "
                "engine.step() in between"
            )
        count = self.gradient_accumulation_steps if scale_wrt_gas else 1
        try:
            train.backward(self.state, loss, count=count)
        except BaseException:
            self.abort()
            raise
        self.phase = Phase.BACKWARD
        self._window += 1
        return loss

    def step(self) -> None:
        """The optimizer step at the gradient-accumulation boundary; nothing in between."""
        if self.phase is not Phase.BACKWARD:
            raise EngineError(
                "engine.step() without engine.backward(loss) for this micro-batch: the loop is "
                "outputs = engine(batch); engine.backward(outputs.loss); engine.step()"
            )
        boundary = self.is_gradient_accumulation_boundary()
        self.phase, self._boundary = Phase.IDLE, None
        self.micro_steps += 1
        micro_batch = self.train_micro_batch_size_per_gpu or 0
        self.global_samples += micro_batch * self.world_size
        if boundary:
            window, self._window = self._window, 0
            self.state, self.metrics = train.apply_step(self.state, window)
            self.global_steps += 1

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(
        self, save_dir: str | os.PathLike, tag: str | None = None, client_state: Any = None
    ) -> Path:
        """Write an fzero sharded checkpoint (call on every rank). Without ``tag`` it goes to
        ``save_dir/step-<n>/`` and ``save_dir/latest`` names it; with ``tag`` to
        ``save_dir/<tag>/step-<n>/``. ``client_state`` (a JSON-serialisable dict) comes back from
        ``load_checkpoint``. Returns the checkpoint directory."""
        from fzero.checkpoint import save

        self._check_between_steps("save_checkpoint")
        try:
            json.dumps(client_state)
        except (TypeError, ValueError) as error:
            raise EngineError(
                f"client_state must be JSON-serialisable (dicts, lists, numbers, strings): "
                f"{error}; store tensors with fzero's checkpoint or convert them with .tolist()"
            ) from None
        counters = {
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "global_samples": self.global_samples,
        }
        root = Path(save_dir) if tag is None else Path(save_dir) / str(tag)
        data_state = {COUNTERS_KEY: counters, CLIENT_STATE_KEY: client_state}
        return save(self.state, root, data_state=data_state)

    def load_checkpoint(
        self, load_dir: str | os.PathLike, tag: str | None = None
    ) -> tuple[Path, Any]:
        """Restore a checkpoint that ``save_checkpoint`` wrote (the newest one under
        ``load_dir``, or under ``load_dir/<tag>``): master weights, moments, step, loss scale,
        RNG, and the engine's counters. Returns ``(path, client_state)``. Training continues
        bitwise as if it had not stopped (same world size and stage)."""
        from fzero.checkpoint import load_data_state, load_into, open_checkpoint

        self._check_between_steps("load_checkpoint")
        root = Path(load_dir) if tag is None else Path(load_dir) / str(tag)
        path = open_checkpoint(root).directory
        self.state = load_into(self.state, path)
        saved = load_data_state(path, self.global_rank) or {}
        counters = saved.get(COUNTERS_KEY, {})
        self.global_steps = counters.get("global_steps", self.state.progress.step_count)
        self.micro_steps = counters.get("micro_steps", 0)
        self.global_samples = counters.get("global_samples", 0)
        self.metrics = {}
        return path, saved.get(CLIENT_STATE_KEY)

    def _check_idle(self) -> None:
        """Refuse a forward while the previous micro-batch still waits for backward or step."""
        if self.phase is Phase.FORWARD:
            raise EngineError(
                "engine(...) was called again before engine.backward(loss): each training "
                "micro-batch is forward, backward, step; for evaluation run the forward under "
                "torch.no_grad()"
            )
        if self.phase is Phase.BACKWARD:
            raise EngineError(
                "engine(...) was called after engine.backward(loss) without engine.step(): call "
                "engine.step() after every backward (it applies the optimizer only at the "
                "gradient-accumulation boundary)"
            )

    def _check_between_steps(self, what: str) -> None:
        if self.phase is not Phase.IDLE or self._window:
            raise EngineError(
                f"engine.{what}() inside a gradient-accumulation window ({self._window} "
                f"micro-batch(es) of {self.gradient_accumulation_steps} accumulated): call it "
                "after the step() that applies "
                "the optimizer, when engine.is_gradient_accumulation_boundary() was true"
            )
