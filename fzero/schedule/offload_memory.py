"""Where the model states of one rank live under offload: device, host and file bytes.

Offload moves buffers off the device; it does not change what a rank holds, only where. With
P = trainable elements / N (the optimizer shard) and F = all elements / N (the parameter shard),
K the optimizer bytes per element, g the gradient-shard bytes and c the compute-dtype bytes:

- ``offload_optimizer`` ``"cpu"`` (stages 1-3): the K P of master weights and moments move to
  the host, beside the g P the gradient shard is copied down into. The updated master goes up
  in fp32 and the device casts it (``HostTransfers.upload``, ``fzero/offload/transfers.py``):
  no host staging buffer. At stage
  3 the device now keeps a c F parameter shard to gather from (without offload it casts the
  master on the fly).
- ``offload_ratio`` r < 1 (``offload_optimizer.ratio``, ``"cpu"`` only): only r P of the
  optimizer shard is offloaded as above (K and g bytes per element on the host); the device
  keeps the other (1 - r) P of master weights and moments, which step there. The estimate takes
  r as exact (r P rounded to an element); the unit split rounds the host's share up to whole
  units, which ``print(state.schedule)`` reports. With ``offload_param`` ``"cpu"`` the whole
  c F shard still moves to the host (below): the device units' stepped values are copied into
  it, and their (1 - r) P of master and moments stay on the device.
- ``offload_optimizer`` ``"nvme"``: the K P go to files; the host keeps the g P buffer and
  ``optimizer_buffer_count`` staging buffers, each one unit's three states (12 bytes per
  element), through which units' states are read, stepped and written back
  (``fzero/offload/staging.py``). They are priced at the largest unit's shard each: an upper
  bound, since the runtime sizes them for the ``optimizer_buffer_count`` largest units, one each
  (``OffloadPlan.staging_nbytes``, which the shard-time host check uses, is exact).
- ``offload_param`` ``"cpu"`` (stage 3): the device's compute-dtype shard lives on the host
  between uses; each gather uploads it first. With optimizer offload that is the c F shard, and
  the CPU step writes straight into it.
  Without optimizer offload only frozen parameters have such a shard: trainable ones are
  gathered from the master, which stays on the device with the optimizer.
- ``offload_param`` ``"nvme"``: the c F go to a file, read through ``param_buffer_count``
  host buffers of the largest unit's shard, and written from two more (DeepSpeed's
  ``buffer_count``; its ``buffer_size`` sizes nothing in fzero, ``param_buffer_size`` is
  accepted for its sake). ``param_max_in_cpu`` (``offload_param.max_in_cpu``) elements of the
  shard also stay in host memory, the file's pages locked there.

On the device the gradient shard stays transient, as without offload: a unit's part is reduced
there and copied down. With ``streamed_gradients`` (``fzero/schedule/streamed_grads.py``: each
unit's gradient lands once per step) only one host unit's part is on the device at a time, in a
buffer of the largest unit's shard (``largest_unit_numel`` / N, None: the whole model as one
unit), beside the device units' (1 - r) P of a partial offload: that is the transient gradient.

Files count their bytes before the 4096-byte padding of each swap file
and without the extra copy a write-then-replace holds while it is in flight (``swap_nbytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fzero.schedule.memory_model import BytesPerParam, ModelStates

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
STATE_ELEMENT_NBYTES = 4  # one fp32 optimizer state (master, exp_avg or exp_avg_sq) per element
STATES_PER_BUFFER = 3  # an NVMe staging buffer holds a unit's master, exp_avg and exp_avg_sq
SHARD_WRITE_BUFFERS = 2  # NVMe parameter offload: the CPU step writes shards from these


@dataclass(frozen=True)
class OffloadStates:
    """Per-rank bytes by residence. ``device`` keeps the ``ModelStates`` meaning (at the
    optimizer step; ``transient_gradients`` the part alive only around it); ``host`` and
    ``file`` hold what moved there; ``host_staging_nbytes`` the swap buffers of NVMe offload."""

    device: ModelStates
    host: ModelStates
    file: ModelStates
    host_staging_nbytes: int = 0

    @property
    def host_nbytes(self) -> int:
        return self.host.total + self.host_staging_nbytes

    @property
    def file_nbytes(self) -> int:
        return self.file.total


def offload_states(
    without_offload: ModelStates,
    *,
    numel: int,
    trainable_numel: int,
    world_size: int,
    stage: int,
    bytes_per_param: BytesPerParam,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    largest_unit_numel: int | None = None,
    optimizer_buffer_count: int = 4,
    param_buffer_count: int = 5,
    param_buffer_size: int = 100_000_000,
    param_max_in_cpu: int = 0,
    offload_ratio: float = 1.0,
    streamed_gradients: bool = False,
) -> OffloadStates:
    """Split ``without_offload`` (fzero's layout, ``model_states(..., layout="fzero")``) by
    residence; see the module docstring for each formula. ``largest_unit_numel`` sizes NVMe
    optimizer staging (None: the whole model as one unit, an upper bound)."""
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"{key} must be one of {OFFLOAD_DEVICES}, got {device!r}")
    if offload_optimizer != "none" and stage == 0:
        raise ValueError("offload_optimizer needs stage 1, 2 or 3 (stage 0 keeps no shard)")
    if offload_param != "none" and stage != 3:
        raise ValueError(f"offload_param needs stage 3, got stage {stage}")
    if not 0.0 <= offload_ratio <= 1.0:
        raise ValueError(f"offload_ratio must lie in [0, 1], got {offload_ratio}")
    if offload_ratio < 1 and (offload_optimizer != "cpu" or offload_param == "nvme"):
        raise ValueError(
            'offload_ratio < 1 needs offload_optimizer "cpu" and offload_param "none" or "cpu", '
            "as zero_optimization.offload_optimizer.ratio does"
        )
    if offload_ratio == 0:  # everything on the device: no optimizer offload
        offload_optimizer = "none"
    b = bytes_per_param
    optimizer_numel = -(-trainable_numel // world_size)
    shard_numel = -(-numel // world_size)
    device = without_offload
    zero = ModelStates(0, 0, 0)
    host, file, staging = zero, zero, 0
    if offload_optimizer != "none":
        host_numel = round(offload_ratio * optimizer_numel)
        kept = (optimizer_numel - host_numel) * b.optimizer_state  # on the device
        gradient_copy = host_numel * b.gradient_shard
        parameters = device.parameters
        if stage == 3:  # a compute-dtype shard to gather from, where the master was
            parameters = shard_numel * b.parameter
        gradients, transient = device.gradients, device.transient_gradients
        if streamed_gradients:  # one host unit's part at a time, and the device units' part
            unit = -(-(largest_unit_numel or trainable_numel) // world_size)
            streamed = (optimizer_numel - host_numel + min(unit, host_numel)) * b.gradient_shard
            gradients, transient = gradients - transient + streamed, streamed
        device = ModelStates(parameters, gradients, kept, transient)
        state = host_numel * b.optimizer_state
        if offload_optimizer == "cpu":
            host = ModelStates(0, gradient_copy, state)
        else:
            host = ModelStates(0, gradient_copy, 0)
            file = ModelStates(0, 0, state)
            unit = -(-(largest_unit_numel or trainable_numel) // world_size)
            per_element = STATES_PER_BUFFER * STATE_ELEMENT_NBYTES
            staging += max(optimizer_buffer_count, 1) * per_element * unit
    if offload_param != "none":
        # The device's compute-dtype shard moves (without optimizer offload that is only the
        # frozen parameters': trainable ones are gathered from the master, which stays with
        # the optimizer).
        moved = device.parameters
        device = replace(device, parameters=0)
        if offload_param == "cpu":
            host = replace(host, parameters=moved)
        else:
            # max_in_cpu elements of it stay in host memory too (the file backs all of it).
            resident = min(param_max_in_cpu * b.parameter, moved)
            host = replace(host, parameters=resident)
            file = replace(file, parameters=moved)
            unit = -(-(largest_unit_numel or numel) // world_size)
            buffers = max(param_buffer_count, 1) + SHARD_WRITE_BUFFERS
            staging += buffers * unit * b.parameter
    return OffloadStates(device, host, file, staging)
