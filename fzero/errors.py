"""Every exception fzero raises on purpose.

Each subclasses a builtin (``ValueError``, ``TypeError`` or ``RuntimeError``) so that callers can
catch either the fzero type or the builtin one.
"""

from __future__ import annotations


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
    """A collective failed or was called with buffers of the wrong size."""


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
    """The directory holds no finished checkpoint: its manifest is missing, so the save that
    wrote it was interrupted (or it is not an fzero checkpoint)."""


class CheckpointCorruptError(CheckpointError):
    """A file the manifest lists is missing, has the wrong size or fails its sha256 checksum."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint was written for a different model: parameter names, shapes or which
    parameters are trainable differ (the message lists the first differences)."""


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
