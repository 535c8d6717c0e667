"""Where a sharded model's state lives under ``zero_optimization.offload_optimizer`` and
``offload_param``, decided once at ``shard`` time from the config.

- ``offload_optimizer.device: "cpu"`` (stages 1-3): the fp32 master weights, both AdamW moments
  and the step count live in host memory, pinned with ``pin_memory``; the optimizer steps there.
- ``offload_param.device: "cpu"`` (stage 3, with optimizer offload): this rank's compute-dtype
  parameter shards live in host memory too, and every gather uploads first.
- ``offload_optimizer.ratio`` < 1 (partial offload): only the last units' optimizer state (about
  that share of it, ``fzero/schedule/offload_split.py``) lives and steps on the host; the other
  units' state stays on the device and steps there, and the master and moments are
  ``SplitFlat`` buffers of two parts (``fzero/state/split.py``). Ratio 0 keeps everything on the
  device: the same as no optimizer offload. With ``offload_param.device: "cpu"`` every unit's
  compute-dtype shard still lives on the host; the device units' updated values are copied
  into it after their device step (``CopyParamsToHost``).
- ``"nvme"`` for either: the same, with those buffers in swap files under ``nvme_path``
  instead of host memory (``FileResidence``, ``fzero/offload/files.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fzero.config import Config
from fzero.errors import ConfigError
from fzero.offload.files import FileResidence
from fzero.offload.host import HOST_REMEDY, HostBuffer, check_host_memory
from fzero.offload.staging import slot_numels
from fzero.runtime.step_phase import OptimizerBuffers
from fzero.schedule.offload_split import OffloadSplit, split_units
from fzero.state.buffers import Workspace
from fzero.state.layout import FlatLayout
from fzero.state.pending import PendingUpdate
from fzero.state.split import SplitFlat


@dataclass(frozen=True)
class HostOptimizerSettings:
    """What the executor needs to build its host optimizer."""

    pin_memory: bool
    compute_dtype: torch.dtype
    params_on_host: bool
    # Partial offload: where the host part starts in the optimizer space (the device part's
    # elements); 0 when every unit steps on the host.
    host_offset_numel: int = 0
    files: FileResidence | None = None  # NVMe offload: the swap files and their staging


# Under NVMe optimizer offload the state is in files already: what is left to move or shrink.
NVME_REMEDY = (
    'Offload the parameters to "nvme" too, lower offload_optimizer.buffer_count (its staging '
    "buffers), or shard over more hosts."
)


@dataclass(frozen=True)
class OffloadPlan:
    optimizer_on_host: bool = False
    params_on_host: bool = False
    pin_memory: bool = False
    ratio: float = 1.0  # offload_optimizer.ratio: the share of the optimizer state on the host
    # device "nvme": the optimizer state / the parameter shards live in swap files
    optimizer_in_files: bool = False
    params_in_files: bool = False
    # NVMe staging buffers (offload_optimizer.buffer_count, offload_param.buffer_count)
    optimizer_buffer_count: int = 0
    param_buffer_count: int = 0
    # offload_param.max_in_cpu under "nvme": parameter elements whose shards stay in memory
    param_max_in_cpu: int = 0

    @classmethod
    def from_config(cls, config: Config) -> OffloadPlan:
        zero = config.zero_optimization
        optimizer = zero.offload_optimizer
        params = zero.offload_param
        on_host = optimizer is not None and optimizer.device in ("cpu", "nvme")
        params_on_host = params is not None and params.device in ("cpu", "nvme")
        ratio = 1.0 if optimizer is None else optimizer.ratio
        if ratio < 1:
            _check_partial(optimizer.device, ratio, params.device if params_on_host else "none")
        if ratio == 0:  # nothing on the host: the optimizer is the device's (as DeepSpeed)
            on_host = False
        if on_host and zero.stage == 0:
            raise ConfigError(
                "zero_optimization.offload_optimizer.device",
                "optimizer offload shards the optimizer state, so it needs stage 1, 2 or 3 "
                "(DeepSpeed's ZeRO-Offload likewise); set zero_optimization.stage",
            )
        if params_on_host and not on_host:
            raise ConfigError(
                "zero_optimization.offload_param.device",
                "parameter offload in fzero runs with optimizer offload: set "
                'offload_optimizer.device to "cpu" or "nvme" as well (the updated parameters '
                "are then written into the offloaded shards by the CPU step, with no copy)",
            )
        if on_host and not config.optimizer.bias_correction:
            raise ConfigError(
                "optimizer.params.bias_correction",
                "false is not available with offload_optimizer (the CPU AdamW step always "
                "corrects the moments' bias): remove it or the offload block",
            )
        pin = bool(
            (optimizer is not None and optimizer.pin_memory)
            or (params is not None and params.pin_memory)
        )
        in_files = on_host and optimizer.device == "nvme"
        params_in_files = params_on_host and params.device == "nvme"
        return cls(
            on_host,
            params_on_host,
            pin,
            ratio=ratio if on_host else 1.0,
            optimizer_in_files=in_files,
            params_in_files=params_in_files,
            optimizer_buffer_count=optimizer.buffer_count if in_files else 0,
            param_buffer_count=params.buffer_count if params_in_files else 0,
            param_max_in_cpu=int(params.max_in_cpu) if params_in_files else 0,
        )

    def resident_shard_units(self, layout: FlatLayout) -> frozenset[int]:
        """Under ``offload_param.device: "nvme"``, the units whose compute-dtype shard stays in
        host memory (``offload_param.max_in_cpu``, DeepSpeed's "parameter elements to keep in
        CPU memory"): the first units in layout order whose shard elements, summed, stay within
        it. Their gathers upload from memory and their CPU steps write it, with no file I/O;
        the file still backs them (``fzero/offload/staging.py``)."""
        if not self.params_in_files:
            return frozenset()
        kept: set[int] = set()
        total = 0
        for unit in layout.units:
            total += unit.shard_numel
            if total > self.param_max_in_cpu:
                break
            kept.add(unit.index)
        return frozenset(kept)

    def split(self, layout: FlatLayout) -> OffloadSplit:
        """Which units' optimizer state is on the host (every unit's at ratio 1)."""
        return split_units(((u.index, u.optimizer_numel) for u in layout.units), self.ratio)

    def device_numel(self, layout: FlatLayout) -> int:
        """Optimizer elements kept on the device under partial offload, at the start of the
        optimizer space; 0 without it (everything on the host, or nothing offloaded)."""
        if not self.optimizer_on_host:
            return 0
        split = self.split(layout)
        return split.device_numel if split.is_partial else 0

    def file_residence(
        self, config: Config, layout: FlatLayout, compute_dtype: torch.dtype, rank: int
    ) -> FileResidence | None:
        """The swap files of NVMe offload, checked and allocated (None without "nvme")."""
        if not (self.optimizer_in_files or self.params_in_files):
            return None
        return FileResidence(
            config,
            layout,
            compute_dtype,
            rank=rank,
            optimizer_in_files=self.optimizer_in_files,
            params_in_files=self.params_in_files,
            pin_memory=self.pin_memory,
            resident_shard_units=self.resident_shard_units(layout),
        )

    def check_host_memory(
        self,
        layout: FlatLayout,
        compute_dtype: torch.dtype,
        grad_dtype: torch.dtype,
        released_nbytes: int = 0,
    ) -> None:
        """Raise at shard time, with the numbers, when this host cannot hold the offload.
        ``released_nbytes``: the model's host parameter bytes that ``shard`` frees as it moves
        them into its buffers (``host.releasable_nbytes``), which the gradient copy and the
        moments, allocated after that, may use; the master, the parameter shards and the NVMe
        staging buffers are allocated before it and must fit beside the model."""
        if not self.optimizer_on_host:
            return
        numel = layout.optimizer_numel - self.device_numel(layout)  # the host units' only
        if self.optimizer_in_files:  # the master and moments are in files: the gradient copy
            nbytes = later = numel * grad_dtype.itemsize
            parts = [f"the gradients of {numel:,} elements"]
        else:
            nbytes = numel * (12 + grad_dtype.itemsize)  # master, moments, gradient copy
            later = numel * (8 + grad_dtype.itemsize)  # the moments and the gradient copy
            parts = [f"fp32 master weights, moments and gradients of {numel:,} elements"]
        if self.params_in_files:
            resident = self.resident_shard_units(layout)
            kept = sum(u.shard_numel for u in layout.units if u.index in resident)
            nbytes += kept * compute_dtype.itemsize
            parts.append(
                f"the parameter shards are in a file, {kept:,} elements of them kept in memory "
                "(offload_param.max_in_cpu)"
            )
        elif self.params_on_host:
            nbytes += layout.shard_numel * compute_dtype.itemsize
            parts.append("offload_param's parameter shards")
        if self.optimizer_in_files or self.params_in_files:
            nbytes += self.staging_nbytes(layout, compute_dtype)
            parts.append("the NVMe staging buffers")
        listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])}, and {parts[-1]}"
        what = f"offload_optimizer ({listed})"
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_host_memory(
            nbytes,
            what,
            ranks_on_host=ranks,
            remedy=NVME_REMEDY if self.optimizer_in_files else HOST_REMEDY,
            released_nbytes=released_nbytes,
            later_nbytes=later,
        )

    def staging_nbytes(self, layout: FlatLayout, compute_dtype: torch.dtype) -> int:
        """Host bytes of NVMe offload's staging buffers (``fzero/offload/staging.py``): each
        one unit's master and moments, or its parameter shard, plus a page either side."""
        nbytes = 0
        if self.optimizer_in_files:  # a slot for each of the buffer_count largest units
            numels = [u.optimizer_numel for u in layout.units if u.optimizer_numel]
            for numel in slot_numels(numels, self.optimizer_buffer_count):
                nbytes += 3 * (numel * 4 + 2 * 4096)
        if self.params_in_files:
            largest = max(u.shard_numel for u in layout.units)
            buffers = self.param_buffer_count + 2  # and two the CPU step writes from
            nbytes += buffers * (largest * compute_dtype.itemsize + 2 * 4096)
        return nbytes

    def optimizer_buffers(
        self,
        master: torch.Tensor | SplitFlat,
        numel: int,
        device: torch.device,
        workspace: Workspace,
        files: FileResidence | None = None,
    ) -> OptimizerBuffers:
        """The AdamW state beside ``master``: on the host under optimizer offload, in files
        under NVMe optimizer offload; under partial offload the moments split where ``master``
        does, and only the host part has a host gradient buffer."""
        if not self.optimizer_on_host:
            zeros = [torch.zeros(numel, dtype=torch.float32, device=device) for _ in range(2)]
            step = torch.zeros((), dtype=torch.float32, device=device)
            return OptimizerBuffers(master, *zeros, step)
        device_numel = master.split_numel if isinstance(master, SplitFlat) else 0
        numel -= device_numel
        moments = []
        for name in ("exp_avg", "exp_avg_sq"):
            if files is not None and files.holds(name):
                moments.append(files.tensor(name))
                continue
            buffer = HostBuffer(numel, torch.float32, pin_memory=self.pin_memory)
            workspace.host_buffers.append(buffer)
            moment = buffer.tensor.zero_()
            if device_numel:
                on_device = torch.zeros(device_numel, dtype=torch.float32, device=device)
                moment = SplitFlat(on_device, moment)
            moments.append(moment)
        # Where gradients come down to, and where a pending update keeps its gradient.
        grad = HostBuffer(numel, workspace.grad_shard.dtype, pin_memory=self.pin_memory)
        workspace.host_buffers.append(grad)
        pending = PendingUpdate.empty(grad.tensor.zero_())
        step = torch.zeros((), dtype=torch.float32)
        return OptimizerBuffers(master, *moments, step, pending)

    def host_optimizer_settings(
        self, compute_dtype: torch.dtype, layout: FlatLayout, files: FileResidence | None = None
    ) -> HostOptimizerSettings | None:
        if not self.optimizer_on_host:
            return None
        return HostOptimizerSettings(
            self.pin_memory,
            compute_dtype,
            self.params_on_host,
            host_offset_numel=self.device_numel(layout),
            files=files,
        )


def _check_partial(device: str, ratio: float, params_device: str) -> None:
    """Refuse what partial offload (``offload_optimizer.ratio`` < 1) cannot do, naming why."""
    key = "zero_optimization.offload_optimizer.ratio"
    if device == "none":
        raise ConfigError(
            key,
            f"ratio {ratio} is the share of the optimizer state that offload_optimizer.device "
            'moves to the host, but the device is "none": set device to "cpu", or remove ratio',
        )
    if device != "cpu":
        raise ConfigError(
            key,
            f"ratio {ratio} splits the optimizer state between the accelerator and CPU Adam, so it "
            f'needs offload_optimizer.device "cpu" (got {device!r}): set ratio to 1 or the device '
            'to "cpu"',
        )
    if ratio == 0 and params_device != "none":
        raise ConfigError(
            key,
            "ratio 0 keeps the whole optimizer state on the accelerator, which is no optimizer "
            "offload, and parameter offload in fzero runs with optimizer offload: set ratio above "
            "0, or remove offload_param",
        )
    if params_device == "nvme":
        raise ConfigError(
            key,
            f'ratio {ratio} with zero_optimization.offload_param.device "nvme" is not available: '
            "the parameter shard file is written through the host optimizer's staging buffers, "
            "which only the host units' CPU steps fill, so the device units' updated values would "
            'never reach the file. Set offload_param.device to "cpu" (the shard then stays in '
            "host memory and the device units' values are copied into it), or ratio to 1",
        )
