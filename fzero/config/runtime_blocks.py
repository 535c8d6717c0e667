"""The blocks of ``fzero.Config`` that shape how fzero runs the model: ``activation_checkpointing``
(which units recompute their forward in backward) and ``fzero`` (fzero's own knobs, which
DeepSpeed has no name for).

``activation_checkpointing`` keeps DeepSpeed's key names; ``validate(path)`` checks ranges
within the block and names the JSON path of a bad key (checks across blocks: ``validate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fzero.config.ranges import check_at_least
from fzero.errors import ConfigError


@dataclass(frozen=True)
class ActivationCheckpointingConfig:
    """``activation_checkpointing``: fzero recomputes units' forwards in backward itself.

    ``number_checkpoints``: how many block units (the first ones, in model order; more than
    there are means all) fzero wraps in ``torch.utils.checkpoint`` (non-reentrant): their
    activations are dropped after forward and recomputed in backward, at the schedule's
    ``pre_recompute`` triggers. (DeepSpeed reads it only to size a buffer for
    ``contiguous_memory_optimization``, for models that call ``deepspeed.checkpointing``.)
    ``cpu_checkpointing``: the inputs those units keep for their recompute are held on the host
    (``torch.autograd.graph.save_on_cpu(pin_memory=True)``) and copied back in backward.
    The block's other keys are warned (``fzero/config/keys_top_level.py``)."""

    number_checkpoints: int | None = None
    cpu_checkpointing: bool = False

    def validate(self, path: str = "activation_checkpointing") -> None:
        check_at_least(f"{path}.number_checkpoints", self.number_checkpoints, 0)
        if self.cpu_checkpointing and not self.number_checkpoints:
            raise ConfigError(
                f"{path}.cpu_checkpointing",
                "keeps the inputs of the units fzero checkpoints on the CPU, but "
                "number_checkpoints is not set: set it (e.g. to the number of layers), or "
                "set cpu_checkpointing to false",
            )


@dataclass(frozen=True)
class FzeroConfig:
    """fzero's own knobs, in the ``fzero`` block (DeepSpeed has no name for them).

    ``no_weight_decay``: glob patterns (``fnmatch``) on parameter names that get weight decay 0,
    e.g. ``["*.bias", "*norm*"]``. ``alignment``: every flat buffer is padded to a multiple of
    world size x alignment elements.

    ``nonfinite_grads``: what a step whose gradients hold Inf or NaN does in fp32 and bf16:
    ``"skip"`` it on every rank (nothing changes; ``metrics["skipped"]``), raise
    ``NonFiniteGradientError`` after skipping it (``"error"``), or ``"apply"`` it as it is (no
    check, no host read; but see ``fzero/runtime/step_checks.py`` for the micro-batch count
    check when ``gradient_accumulation_steps`` is unset). fp16 always skips and lowers the loss
    scale.

    ``reduce_every_micro_batch``: stages 2 and 3 reduce each micro-batch's gradient into the
    fp32 gradient shard (true, the default), or keep every unit's full gradient across the
    micro-batches and reduce once, at the last one (false: 1/micro_batches of the traffic, full
    gradients held through the step). Stages 0 and 1 always reduce once per step.

    ``deterministic``: reduce in a fixed order that depends neither on the world size nor on
    the layout, so that N ranks match one device that sums the same micro-batch gradients in
    order bit for bit (``fzero/schedule/compile.py`` says how, and what it costs).

    ``compile_units``: run each block unit's ``forward`` through ``torch.compile`` (the hooks
    that gather, release and reduce stay outside the compiled code). Off by default.

    ``cast_forward_inputs``: with bf16 or fp16 compute, cast the floating-point tensors of each
    micro-batch to the compute dtype before the forward (as FSDP2's
    ``MixedPrecisionPolicy(cast_forward_inputs=True)``); integer tensors are left alone. Set it
    false to pass the batch as given (``fp16.auto_cast`` still casts to fp16, as in DeepSpeed).

    ``embedding_units``: besides the repeated blocks, make every ``nn.Embedding`` outside them
    a unit of its own (default units: the blocks plus one for the rest). Stage 3 then gathers an
    embedding for its forward only and releases it right after, instead of holding it with the
    root from the start of forward to the end of backward. Off by default.

    ``step_timeout_s``: how long a step may wait at one op before every rank that waits raises
    ``StepTimeoutError``, saying which op each rank was at (``fzero/runtime/watchdog.py``).
    Well under the process group's timeout (30 minutes by default); when fzero creates the
    group (``fzero.collectives.init_from_env``) the group's is set a minute longer.

    ``offload_update_in_forward``: with ``offload_optimizer`` at stage 3, run each unit's CPU
    AdamW step in the next step's first forward, right before the unit is gathered, instead of
    all of them at the end of the step: the CPU steps of later units overlap the forward of
    earlier ones. Exact (every unit computes with its updated values); the update waits in the
    state (``ZeroState.pending``) between the steps. True by default; false runs every CPU step
    in the step phase.

    ``stream_gradients``: with ``offload_optimizer``, let each host unit's reduced gradient go
    down to the host as soon as it lands, from a device buffer of one unit, instead of keeping
    the whole gradient shard on the device through the step (never in ``deterministic`` mode).
    Unset (None): where no unit's gradient lands twice in a step, so streaming costs no copy
    (stage 1, or ``gradient_accumulation_steps`` 1). True: with accumulation too, each
    micro-batch after the first bringing the unit's sum so far back up from the host to add to
    (two copies of the host units' gradient per micro-batch; the same values bit for bit).
    False: the whole shard stays (``docs/offload.md``).
    """

    no_weight_decay: tuple[str, ...] = ()
    cast_forward_inputs: bool = True
    alignment: int = 16
    nonfinite_grads: Literal["skip", "error", "apply"] = "skip"
    reduce_every_micro_batch: bool | None = None
    deterministic: bool = False
    compile_units: bool = False
    embedding_units: bool = False
    step_timeout_s: float = 300.0
    offload_update_in_forward: bool = True
    stream_gradients: bool | None = None
