"""``train_step``: one optimizer step of a sharded model, micro-batches to metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from fzero.errors import BatchError, LossError, NonFiniteGradientError, ScheduleError
from fzero.executor import Hyper
from fzero.inputs import cast_floating_inputs, check_batch_kind, input_cast_dtype
from fzero.loss_scale import update
from fzero.runtime import Runtime
from fzero.state.zero_state import ZeroState


def train_step(state: ZeroState, batch: Any) -> tuple[ZeroState, dict[str, Any]]:
    """One optimizer step: forward and backward over each micro-batch, the gradient
    collectives, and AdamW on this rank's shard.

    ``batch`` is one micro-batch or a list of micro-batches accumulated into one step. The
    state's buffers are donated: they may be updated in place, and ``state`` must not be used
    again; use the returned one. Metric values ``loss`` and ``grad_norm`` are 0-dim tensors
    (reading them syncs with the device), averaged over micro-batches and ranks; ``grad_norm``
    is the unscaled gradient's.

    Non-finite gradients on any rank skip the whole step on every rank (no parameter, moment or
    step-count change; the learning-rate schedule does not advance), unless
    ``fzero.nonfinite_grads`` is ``"apply"``; ``"error"`` raises ``NonFiniteGradientError`` after
    skipping, leaving ``state`` usable. In fp16 the loss is multiplied by ``loss_scale`` before
    backward and the scale follows DeepSpeed's dynamic rule (``fzero/loss_scale.py``). Deciding
    whether the step was skipped reads one flag on the host, once per step, after the optimizer
    kernel is queued: the host waits for the step to finish there, the device does not idle
    (``"apply"`` skips the check and the read). ``metrics``: ``skipped`` (this step),
    ``skipped_steps`` (so far), ``loss_scale`` (for the next step), ``step`` (steps run, skipped
    ones included).
    """
    state.check_live()
    runtime: Runtime = state.runtime
    cfg, executor, hooks = runtime.config, runtime.executor, runtime.hooks
    check_batch_kind(batch, runtime.loss_fn is not None)
    micro_batches = batch if isinstance(batch, list) else [batch]
    if not micro_batches:
        raise BatchError("batch is an empty list; give at least one micro-batch")
    expected = cfg.gradient_accumulation_steps
    if expected is not None and len(micro_batches) != expected:
        raise BatchError(
            f"got {len(micro_batches)} micro-batches but gradient_accumulation_steps is "
            f"{expected}; pass a list of {expected} micro-batches (or fix the config)"
        )
    opt, scale = cfg.optimizer, runtime.loss_scaler.scale
    applied = runtime.step_count - runtime.skipped_steps  # skipped steps keep the lr schedule
    executor.hyper = Hyper(
        cfg.lr_at(applied),
        opt.betas[0],
        opt.betas[1],
        opt.eps,
        cfg.gradient_clipping,
        loss_scale=scale,
        check_finite=runtime.check_finite,
        bias_correction=opt.bias_correction,
    )
    count = len(micro_batches)
    try:
        for index, micro_batch in enumerate(micro_batches):
            hooks.begin_micro_step(last=index == count - 1)
            micro_batch = cast_floating_inputs(micro_batch, input_cast_dtype(cfg))
            loss = _forward(runtime, micro_batch, index)
            executor.add_loss(loss)
            hooks.begin_backward()
            scaled = loss / count if count > 1 else loss
            (scaled * scale if scale != 1.0 else scaled).backward()
            hooks.end_backward()
    except BaseException:
        hooks.deactivate()
        executor.abort()
        raise
    result = executor.run_step(count)
    runtime.step_count += 1
    # The step's one host read: whether any rank's gradients were not finite.
    skipped = result.found_inf is not None and bool(result.found_inf.item())
    runtime.skipped_steps += skipped
    # Both errors come before the state is donated: nothing changed, ``state`` stays usable.
    runtime.loss_scaler = update(runtime.loss_scaler, skipped)
    if skipped and cfg.fzero.nonfinite_grads == "error":
        raise NonFiniteGradientError(
            f"step {runtime.step_count}: the gradients hold Inf or NaN on some rank; the step was "
            'skipped on every rank (fzero.nonfinite_grads is "error")'
        )
    new_state = dataclasses.replace(state)
    runtime.live_state = new_state
    metrics = {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": executor.hyper.lr,
        "loss_scale": runtime.loss_scaler.scale,
        "skipped": skipped,
        "skipped_steps": runtime.skipped_steps,
        "step": runtime.step_count,
    }
    return new_state, metrics


# -- helpers ------------------------------------------------------------------------------------


def _forward(runtime: Runtime, micro_batch: Any, index: int) -> torch.Tensor:
    model = runtime.model
    try:
        if runtime.loss_fn is not None:
            output = runtime.loss_fn(model, micro_batch)
        elif isinstance(micro_batch, Mapping):
            output = model(**micro_batch)
        elif isinstance(micro_batch, tuple):
            output = model(*micro_batch)
        else:
            output = model(micro_batch)
    except ScheduleError:
        raise
    except Exception as error:
        hint = RELEASED_HINT if _released(error) else ""
        raise BatchError(
            f"micro-batch {index}: the model raised {type(error).__name__}: {error}{hint}"
        ) from error
    return _loss_of(output)


RELEASED_HINT = (
    ". A parameter was read while released: stage 3 frees a unit's parameters outside its "
    "forward and backward, so a parameter used by code outside its unit (say an output head "
    "computing with `self.wte.weight`, with the embedding a unit) must belong to a unit that "
    "is gathered there: call the module that owns it instead, or choose `units=` so that "
    "both uses are in one unit (the root when nothing else fits)"
)


def _released(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch refusing to read a tensor whose storage fzero freed."""
    return "out of bounds for storage of size 0" in str(error)


def _loss_of(output: Any) -> torch.Tensor:
    loss = output
    if not isinstance(loss, torch.Tensor):
        if isinstance(output, Mapping) and "loss" in output:
            loss = output["loss"]
        elif hasattr(output, "loss"):
            loss = output.loss
    if not isinstance(loss, torch.Tensor):
        raise LossError(
            f"cannot find a loss in the model's output of type {type(output).__name__}: return a "
            "scalar tensor, an object with .loss, or a mapping with 'loss' (or pass loss_fn)"
        )
    if loss.numel() != 1 or not loss.is_floating_point():
        raise LossError(
            f"the loss must be a floating-point scalar, got shape {tuple(loss.shape)} "
            f"dtype {loss.dtype}; reduce it (e.g. .mean()) or pass loss_fn"
        )
    if not loss.requires_grad:
        raise LossError("the loss does not require grad: no trainable parameter contributed to it")
    return loss.reshape(())
