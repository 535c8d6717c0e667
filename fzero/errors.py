"""Every exception fzero raises on purpose.

Each subclasses a builtin (``ValueError``, ``TypeError`` or ``RuntimeError``) so that callers can
catch either the fzero type or the builtin one.
"""

from __future__ import annotations

import torch


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, out of range or contradictory.

    ``path`` is the JSON path of the offending key, e.g. ``zero_optimization.stage``.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type."""


class ConfigWarning(UserWarning):
    """A configuration key is accepted but has no effect in fzero (the message says why).

    Issued through ``warnings.warn``, so Python shows each distinct message once per process.
    """


class ShardError(ValueError):
    """The model or arguments given to ``fzero.shard`` cannot be sharded as asked."""


class BatchError(ValueError):
    """A batch cannot be run: wrong micro-batch count, or the model rejected it."""


class LossError(TypeError):
    """The model (or ``loss_fn``) returned something fzero cannot read a scalar loss from."""


class ScheduleError(RuntimeError):
    """A schedule breaks an invariant, or the model ran in a different order than it was traced."""


class ScheduleMismatchError(ScheduleError):
    """Ranks compiled different layouts or schedules (different model, config or world view)."""


class DonatedStateError(RuntimeError):
    """A state was used after it was donated to ``train_step``."""


class CollectiveError(RuntimeError):
    """A collective failed or was called with buffers of the wrong size. Raised inside a step,
    the message names the schedule's op it failed in."""


class RankLostError(CollectiveError):
    """A collective of the step failed because a peer went away (its process died or its
    connection closed). The message names the op and, where the others could tell, the ranks
    that did not report (the lost ones). The process group cannot be used again: restart the
    job (from the last checkpoint)."""


class StepTimeoutError(CollectiveError, TimeoutError):
    """A step waited at one op longer than ``fzero.step_timeout_s``. The message says, for
    every rank that could report, which op of the schedule it was at and for how long, and which
    ranks did not arrive at this rank's op."""


class MicroBatchCountError(BatchError):
    """Ranks ran different numbers of micro-batches in one step; the message names each rank's
    count. Nothing was updated: the state given to the step stays usable."""


class RequiresGradChangedError(ValueError):
    """A parameter's ``requires_grad`` changed after ``fzero.shard``, which planned the flat
    buffers, hooks and schedule for the flags it saw."""


class StepOutOfMemoryError(torch.OutOfMemoryError):
    """The device ran out of memory inside a step. The message holds the schedule's predicted
    peak, the largest unit and the remedies in order; the micro-steps were aborted, so the
    state given to the step stays usable. Catchable as ``torch.OutOfMemoryError``."""


class ScheduleInvariantError(ScheduleError):
    """``verify`` found a schedule that breaks an invariant.

    ``invariant`` is a short name of the broken rule (e.g. ``"gather-before-use"``), ``where``
    the op's position (phase, entry index, trigger, op) and ``unit`` the unit concerned (-1
    when the rule is about no single unit).
    """

    def __init__(self, invariant: str, where: str, unit: int, message: str):
        self.invariant = invariant
        self.where = where
        self.unit = unit
        super().__init__(f"{where}: {message} [{invariant}]")


class NonFiniteGradientError(RuntimeError):
    """A step's gradients hold Inf or NaN and ``fzero.nonfinite_grads`` is ``"error"``. The step
    was skipped on every rank (nothing was updated), so the state stays usable."""


class LossScaleError(RuntimeError):
    """fp16 gradients overflowed at ``fp16.min_loss_scale``: the dynamic loss scale cannot go
    lower (DeepSpeed stops the run here too). The step was skipped; the state stays usable."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file and why."""


class CheckpointWriteError(CheckpointError):
    """``fzero.save`` failed on some rank (unwritable directory, disk full, ...). The partial
    checkpoint was removed and the previous one is untouched; ``__cause__`` holds the OS error
    on the rank that raised it."""


class CheckpointIncompleteError(CheckpointError):
    """The directory holds no finished checkpoint: its commit record (``commit.json``) is
    missing, so the save that wrote it was interrupted (or it is not an fzero checkpoint)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint changed after its save committed it: the manifest no longer matches the
    sha256 its commit record holds, the commit record is unreadable, or a file the manifest
    lists is missing, has the wrong size or fails its sha256 checksum. The message names it."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was written for a different model: parameter names, shapes or which
    parameters are trainable differ (the message lists the first differences)."""


class HostMemoryError(ShardError):
    """The host memory an offload needs exceeds what this machine (or its cgroup) has available.

    Raised at ``shard`` time, before anything is allocated, instead of an out-of-memory kill
    later. ``needed_nbytes`` and ``available_nbytes`` are per host; ``released_nbytes`` is what
    the model's own host parameters free as ``shard`` moves them into its buffers (counted as
    available for what is allocated after that).
    """

    def __init__(
        self, message: str, needed_nbytes: int, available_nbytes: int, released_nbytes: int = 0
    ):
        self.needed_nbytes = needed_nbytes
        self.available_nbytes = available_nbytes
        self.released_nbytes = released_nbytes
        super().__init__(message)


class PinnedMemoryWarning(UserWarning):
    """Host buffers could not be pinned (page-locked) and are pageable instead: copies to and
    from the device still work, but cannot overlap compute and run at a fraction of the speed."""


class ResidencyWarning(UserWarning):
    """Parameter shards meant to stay in host memory under NVMe offload
    (``offload_param.max_in_cpu``) could not be locked there: they are ordinary page cache,
    which the kernel may evict under memory pressure (still correct, slower when it does)."""


class SwapPathError(ConfigError):
    """``nvme_path`` cannot hold the swap files: missing, not a directory, not writable, or on a
    filesystem with less free space than they need. ``path`` is the config key, ``directory``
    the directory named there."""

    def __init__(self, key: str, directory: str, message: str):
        self.directory = directory
        super().__init__(key, message)


class SwapIOError(RuntimeError):
    """A swap file could not be read or written (the disk filled, the file vanished, the device
    failed). A failed write never touches the copy it was replacing, so the state the step
    started from is still readable; ``__cause__`` holds the OS error."""


class ReleasedParameterError(RuntimeError):
    """A stage-3 parameter's values were read while its unit is released (its memory given
    back between uses); the message names the parameter and how to read it."""


class LauncherError(ValueError):
    """The ``fzero`` launcher (or a launcher's environment) cannot run the job as asked; the
    message names the flag or variable and the fix."""


class AutoConfigMismatchError(ConfigError):
    """An explicit DeepSpeed config value contradicts the ``TrainingArguments`` value it must
    equal. ``mismatches`` lists every ``(config key, config value, argument, argument value)``."""

    def __init__(self, mismatches: list[tuple[str, object, str, object]]):
        self.mismatches = mismatches
        lines = "\n".join(
            f"- config {key}={value!r} vs TrainingArguments {argument}={given!r}"
            for key, value, argument, given in mismatches
        )
        super().__init__(
            mismatches[0][0],
            "the DeepSpeed config contradicts the TrainingArguments:\n"
            f'{lines}\nset these config values to "auto" (or change the arguments to match)',
        )


class EngineError(RuntimeError):
    """An ``fzero.initialize`` engine was driven out of order (say ``backward`` without a
    forward through the engine); the message gives the loop that works."""


class UnsupportedArgumentError(ValueError):
    """``fzero.initialize`` (or the fzero Trainer) was handed an object fzero does not take,
    such as a torch optimizer or lr scheduler; the message says what to put in the config."""


class OutsideStepError(RuntimeError):
    """A gradient of a sharded parameter was produced outside a fzero step (``loss.backward()``
    with a torch optimizer, a plain Trainer, ``accelerator.prepare`` or DDP around a model fzero
    owns): it would train the ranks apart and leave the master weights stale. The message says
    which entry point to use instead."""
