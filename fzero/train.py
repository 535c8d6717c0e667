"""``train_step``: one optimizer step of a sharded model, micro-batches to metrics.

It is the composition of two steps that the integrations (the DeepSpeed-style engine, the
Trainer) also use on their own:

- ``micro_step(state, micro_batch, index=, count=)``: forward and backward of one micro-batch,
  with the gradient collectives the schedule keys into backward. Its pieces, for callers that
  run the forward themselves: ``begin_micro_step``, ``compute_loss`` (or the caller's own
  forward while the micro-step is armed), ``backward``; ``abort_micro_steps`` after an error.
- ``apply_step(state, count)``: the step phase (the remaining reductions, the global norm,
  clipping, AdamW on this rank's shard); it returns the new state and the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fzero.errors import (
    BatchError,
    CollectiveError,
    LossError,
    NonFiniteGradientError,
    ReleasedParameterError,
    ScheduleError,
)
from fzero.inputs import cast_floating_inputs, check_batch_kind, input_cast_dtype
from fzero.loss_scale import update
from fzero.runtime import Runtime
from fzero.runtime.failures import op_failure, out_of_memory, reserved_free_nbytes
from fzero.runtime.step_phase import Hyper
from fzero.state.zero_state import ZeroState


def train_step(state: ZeroState, batch: Any) -> tuple[ZeroState, dict[str, Any]]:
    """One optimizer step: forward and backward over each micro-batch, the gradient
    collectives, and AdamW on this rank's shard.

    ``batch`` is one micro-batch or a list of micro-batches accumulated into one step. The
    state's buffers are donated: they may be updated in place, and ``state`` must not be used
    again; use the returned one. Any state of this model is accepted, a ``tree_map`` copy
    included (``Runtime.install``). Metric values ``loss`` and ``grad_norm`` are 0-dim tensors
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
    micro_batches = micro_batches_of(state, batch)
    count = len(micro_batches)
    for index, micro_batch in enumerate(micro_batches):
        micro_step(state, micro_batch, index=index, count=count)
    return apply_step(state, count)


def micro_batches_of(state: ZeroState, batch: Any) -> list[Any]:
    """``batch`` as the list of micro-batches one step runs, checked against the config."""
    check_batch_kind(batch, state.runtime.loss_fn is not None)
    micro_batches = batch if isinstance(batch, list) else [batch]
    if not micro_batches:
        raise BatchError("batch is an empty list; give at least one micro-batch")
    expected = state.runtime.config.gradient_accumulation_steps
    if expected is not None and len(micro_batches) != expected:
        raise BatchError(
            f"got {len(micro_batches)} micro-batches but gradient_accumulation_steps is "
            f"{expected}; pass a list of {expected} micro-batches (or fix the config)"
        )
    return micro_batches


def micro_step(
    state: ZeroState, micro_batch: Any, *, index: int = 0, count: int = 1
) -> torch.Tensor:
    """Forward and backward of micro-batch ``index`` of ``count`` in this step; returns its
    loss, detached. On an error the micro-step is aborted (``abort_micro_steps``) and the state
    stays usable. The first micro-step checks that every rank runs ``count`` (see
    ``fzero/runtime/step_checks.py``); a device out of memory raises ``StepOutOfMemoryError``."""
    runtime: Runtime = state.runtime
    if index == 0:
        _check_count_up_front(runtime, count)
    begin_micro_step(state, last=index == count - 1)
    try:
        loss = compute_loss(state, micro_batch, index)
        backward(state, loss, count=count)
    except torch.OutOfMemoryError as error:
        reserved_free = reserved_free_nbytes(state.device)  # before the abort frees tensors
        abort_micro_steps(state)
        raise out_of_memory(runtime, error, f"micro-batch {index}", reserved_free) from error
    except BaseException:
        abort_micro_steps(state)
        raise
    return loss.detach()


def _check_count_up_front(runtime: Runtime, count: int) -> None:
    executor = runtime.executor
    try:
        runtime.checks.check_count_up_front(executor.schedule, count, executor.workspace.device)
    except RuntimeError as error:
        failure = op_failure(error, executor)
        if failure is error:
            raise
        raise failure from error


def begin_micro_step(state: ZeroState, *, last: bool) -> None:
    """Install ``state`` and arm the hooks for one micro-batch; ``last``: the last one before
    the optimizer step (it may run other ops). The model's forward may then run, by
    ``compute_loss`` or by the caller."""
    runtime: Runtime = state.runtime
    if runtime.executor.micro_steps_run == 0:  # the step's first
        runtime.checks.check_requires_grad()
    # An update the state holds pending is applied unit by unit in this forward (offload).
    runtime.install(state, keep_pending=True)
    runtime.hooks.begin_micro_step(last=last)


def compute_loss(state: ZeroState, micro_batch: Any, index: int = 0) -> torch.Tensor:
    """The loss of one micro-batch: ``loss_fn(model, batch)`` when given to ``shard``, else
    the model called on it (see ``train_step``)."""
    runtime: Runtime = state.runtime
    micro_batch = cast_floating_inputs(micro_batch, input_cast_dtype(runtime.config))
    return _forward(runtime, micro_batch, index)


def backward(state: ZeroState, loss: torch.Tensor, *, count: int) -> None:
    """Backward of one micro-batch's ``loss`` (divided by ``count``, multiplied by the fp16
    loss scale), with the gradient collectives the schedule keys into it; ends the micro-step.
    The first micro-step traces the model's order and installs the compiled schedule."""
    loss = _loss_of(loss)
    runtime: Runtime = state.runtime
    hooks, executor = runtime.hooks, runtime.executor
    scale = float(state.progress.loss_scale)
    executor.add_loss(loss)
    hooks.begin_backward()
    scaled = loss / count if count > 1 else loss
    (scaled * scale if scale != 1.0 else scaled).backward()
    trace = hooks.end_backward()
    if trace is not None:
        runtime.retrace(trace)


def abort_micro_steps(state: ZeroState) -> None:
    """After an error in a micro-step: disarm the hooks, wait for collectives in flight and
    drop this step's partial gradients. Parameters, master weights and moments are untouched."""
    runtime: Runtime = state.runtime
    runtime.hooks.deactivate()
    runtime.executor.abort()


def apply_step(state: ZeroState, count: int) -> tuple[ZeroState, dict[str, Any]]:
    """The step phase after ``count`` micro-steps: reductions left, global loss and gradient
    norm, clipping, AdamW. Donates ``state``; returns the new state and ``train_step``'s
    metrics."""
    runtime: Runtime = state.runtime
    runtime.install(state, keep_pending=True)
    cfg, opt, progress = runtime.config, runtime.config.optimizer, state.progress
    hyper = Hyper(
        cfg.lr_at(progress.applied_steps),  # skipped steps keep the lr schedule where it was
        opt.betas[0],
        opt.betas[1],
        opt.eps,
        cfg.gradient_clipping,
        loss_scale=float(progress.loss_scale),
        check_finite=runtime.check_finite,
        bias_correction=opt.bias_correction,
        check_counts=runtime.checks.compare_counts,
    )
    try:
        result = runtime.executor.run_step(count, hyper)
    except torch.OutOfMemoryError as error:
        reserved_free = reserved_free_nbytes(runtime.executor.workspace.device)
        runtime.executor.abort()
        raise out_of_memory(runtime, error, "the step phase", reserved_free) from error
    # The step's one host read: whether any rank's gradients were not finite (or, with
    # check_counts, the ranks' micro-batch counts differ).
    skipped = result.found_inf is not None and bool(result.found_inf.item())
    if skipped:
        runtime.checks.raise_if_counts_differ(
            result.counts, progress.step_count, runtime.executor.abort
        )
    # A LossScaleError comes before the state is donated: ``state`` stays usable.
    scaler = update(progress.scaler(runtime.loss_scale_rule), skipped)
    progress = progress.after_step(skipped, scaler)
    if skipped and cfg.fzero.nonfinite_grads == "error":
        # Nothing but the counters changed: ``state`` stays usable and counts the skip.
        state.progress.assign(progress)
        raise NonFiniteGradientError(
            f"step {progress.step_count}: the gradients hold Inf or NaN on some rank; the step "
            'was skipped on every rank (fzero.nonfinite_grads is "error")'
        )
    runtime.donate(state)
    new_state = runtime.new_state(progress)
    metrics = {
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "lr": hyper.lr,
        "loss_scale": scaler.scale,
        "skipped": skipped,
        "skipped_steps": progress.skipped_count,
        "step": progress.step_count,
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
    except (ScheduleError, CollectiveError, torch.OutOfMemoryError):
        raise  # the schedule's, a collective's or the device's failure: not the batch's
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
    if isinstance(error, ReleasedParameterError):
        return True
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
