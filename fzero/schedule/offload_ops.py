"""Offload's ops: gradients down to the host, the CPU optimizer step, parameters back up (or,
for partial offload's device units under parameter offload, down), and parameter shards brought
up for their gathers (``fzero/schedule/offload.py`` places them). They
run on the host's and the copy engines' streams, sized by this rank's own shard, so they are not
collectives (``signature.is_collective``)."""

from __future__ import annotations

from dataclasses import dataclass

from fzero.schedule.ops import DEVICE_TO_HOST, GATHER, HOST, HOST_TO_DEVICE, Op, _size, _unit_label


@dataclass(frozen=True)
class CopyGradToHost(Op):
    """Optimizer offload: copy unit ``unit``'s slice of the gradient shard, once its last
    reduction of the step has landed, into its host gradient buffer (``nbytes``, in the
    gradient-accumulation dtype), on the device-to-host stream: it runs while later units'
    backward computes."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return DEVICE_TO_HOST

    def __str__(self) -> str:
        return f"CopyGradToHost {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class GradFromHost(Op):
    """Streamed gradients with accumulation (``streamed_grads.py``): right after unit
    ``unit``'s ``AllocUnitGrad``, where its gradient was copied down earlier in this step (an
    earlier micro-batch's landing), bring that sum (``nbytes``) back up into the gradient
    buffer, on the host-to-device stream, so that the landing adds to it; the device waits for
    the copy before the landing. In the step's first landing of the unit it does nothing."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return HOST_TO_DEVICE

    def __str__(self) -> str:
        label = _unit_label(self.unit, self.name)
        return f"GradFromHost {label}  {_size(self.nbytes)}  (after its first landing of a step)"


@dataclass(frozen=True)
class ScalarsToHost(Op):
    """Optimizer offload: read the step's overflow flag and gradient norm on the host (one
    sync), which the CPU steps need for skipping and clipping."""

    def __str__(self) -> str:
        return "ScalarsToHost found_inf, grad_norm"


@dataclass(frozen=True)
class HostOptimizerStep(Op):
    """Optimizer offload: AdamW on the host over unit ``unit``'s ``numel`` elements of the
    master and moments (torch's fused CPU kernel, one pass per weight-decay value), once its
    gradient copy has landed (the host waits for it); with parameter offload it also writes the
    host parameter shard, in the compute dtype (``shard_nbytes``; 0 without: one more pass over
    the updated master). Skipped, like ``OptimizerStep``, when some rank overflowed."""

    unit: int
    name: str
    numel: int
    shard_nbytes: int = 0

    @property
    def stream(self) -> str:
        return HOST

    def __str__(self) -> str:
        label = _unit_label(self.unit, self.name)
        return f"HostOptimizerStep {label}  {self.numel:,} elements{_writes(self.shard_nbytes)}"


def _writes(shard_nbytes: int) -> str:
    return f", writes its {_size(shard_nbytes)} host shard" if shard_nbytes else ""


@dataclass(frozen=True)
class CopyParamsToDevice(Op):
    """Optimizer offload: copy unit ``unit``'s updated fp32 master slice (``nbytes``) up, on the
    host-to-device stream, and cast it there into the device shard the gathers read, right after
    its ``HostOptimizerStep``: uploads of earlier units overlap the CPU steps of later ones, and
    the host spends no memory bandwidth on a cast."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return HOST_TO_DEVICE

    def __str__(self) -> str:
        return f"CopyParamsToDevice {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class WaitUploads(Op):
    """The compute stream waits for every ``CopyParamsToDevice`` of the step."""

    def __str__(self) -> str:
        return "WaitUploads"


@dataclass(frozen=True)
class CopyParamsToHost(Op):
    """Partial offload with parameter offload (stage 3): right after the device
    ``OptimizerStep`` of ``units`` (the device units), cast their updated fp32 master into their
    slices of the host compute-dtype shard (``nbytes`` come down), which their next
    ``UploadShard`` sends up again. Queued after the device step, so it copies the stepped
    values; copies nothing when the step is skipped."""

    units: tuple[int, ...]
    nbytes: int

    @property
    def stream(self) -> str:
        return DEVICE_TO_HOST

    def __str__(self) -> str:
        listed = ", ".join(str(u) for u in self.units)
        return f"CopyParamsToHost units {listed}  {_size(self.nbytes)}"


@dataclass(frozen=True)
class UploadShard(Op):
    """Parameter offload (stage 3): copy this rank's compute-dtype shard of unit ``unit``
    (``nbytes``) from host memory to the device, on the gather stream, for the ``AllGather``
    that follows it to send. ``from_file``: the shard is in a swap file (``offload_param``
    ``"nvme"``) and uploads from the staging buffer its ``ReadShardFromFile`` filled; False for
    a shard in host memory (``"cpu"``, or kept there by ``max_in_cpu``)."""

    unit: int
    name: str
    nbytes: int
    from_file: bool = False

    @property
    def stream(self) -> str:
        return GATHER

    def __str__(self) -> str:
        where = "  from its file" if self.from_file else ""
        return f"UploadShard  {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}{where}"


@dataclass(frozen=True)
class ApplyPendingUpdate(Op):
    """Optimizer offload at stage 3: the previous step's ``HostOptimizerStep`` of unit ``unit``,
    run in the first micro-batch's forward right before the unit is first gathered, so that
    the CPU steps of later units overlap the forward of earlier ones. The previous step left
    its reduced gradient and its factors in the state (``ZeroState.pending``); nothing is
    stale: unit ``unit`` computes with its updated values. Does nothing when no update is
    pending (the first step, a skipped one, or a state whose update was applied already).
    ``shard_nbytes`` as ``HostOptimizerStep``'s."""

    unit: int
    name: str
    numel: int
    shard_nbytes: int = 0

    @property
    def stream(self) -> str:
        return HOST

    def __str__(self) -> str:
        label = _unit_label(self.unit, self.name)
        writes = _writes(self.shard_nbytes)
        return f"ApplyPendingUpdate {label}  {self.numel:,} elements (the previous step's){writes}"


@dataclass(frozen=True)
class UploadUpdate(Op):
    """After ``ApplyPendingUpdate``: copy unit ``unit``'s updated fp32 master slice
    (``nbytes``) up on the host-to-device stream and cast it into the device shard there; the
    compute stream waits for it, so the ``AllGather`` that follows sends the updated values."""

    unit: int
    name: str
    nbytes: int

    @property
    def stream(self) -> str:
        return HOST_TO_DEVICE

    def __str__(self) -> str:
        return f"UploadUpdate {_unit_label(self.unit, self.name)}  {_size(self.nbytes)}"
