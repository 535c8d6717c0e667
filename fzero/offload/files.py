"""NVMe offload's residence: this rank's optimizer state and parameter shards in swap files.

``FileResidence`` is built at ``shard`` time when ``offload_optimizer.device`` or
``offload_param.device`` is ``"nvme"``. It checks each ``nvme_path`` (``SwapPathError``
naming the key, the path and the bytes needed), starts one swapper per directory (its files in
a directory of its own, per rank and run, removed on normal exit and by the next start after a
crash), and allocates the file-backed leaves: the fp32 master and both moments under optimizer
offload, the compute-dtype parameter shard under parameter offload (``MappedFile``: mapped
into memory, space reserved up front). Everything else a sharded model holds stays where it
was. The staging buffers the ops' handlers move ranges through are ``staging.py``'s.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import asdict

import torch

from fzero.config import Config
from fzero.errors import ConfigError, SwapIOError, SwapPathError
from fzero.offload.aio import AioSettings, round_up
from fzero.offload.mapped import MappedFile
from fzero.offload.staging import OptimizerStaging, ShardStaging
from fzero.offload.swap import NvmeSwapper
from fzero.state.layout import FlatLayout

OPTIMIZER_KEY = "zero_optimization.offload_optimizer"
PARAM_KEY = "zero_optimization.offload_param"
OPTIMIZER_FILES = ("master", "exp_avg", "exp_avg_sq")
SHARD_FILE = "param_shard"


class FileResidence:
    """The swap files of one rank: ``tensor(name)`` is a file-backed leaf; ``optimizer`` and
    ``shards`` the staging of the step's reads and writes (None for what is not in files)."""

    def __init__(
        self,
        config: Config,
        layout: FlatLayout,
        compute_dtype: torch.dtype,
        *,
        rank: int,
        optimizer_in_files: bool,
        params_in_files: bool,
        pin_memory: bool,
        resident_shard_units: frozenset[int] = frozenset(),
    ):
        zero = config.zero_optimization
        self.resident_shard_units = resident_shard_units
        aio = _aio_settings(config)
        needs: dict[str, list] = {}  # real directory -> [key, bytes needed, path as given]
        if optimizer_in_files:
            _check_buffer_count(f"{OPTIMIZER_KEY}.buffer_count", zero.offload_optimizer)
            nbytes = 3 * round_up(layout.optimizer_numel * 4)
            _need(needs, zero.offload_optimizer.nvme_path, f"{OPTIMIZER_KEY}.nvme_path", nbytes)
        if params_in_files:
            _check_buffer_count(f"{PARAM_KEY}.buffer_count", zero.offload_param)
            nbytes = round_up(layout.shard_numel * compute_dtype.itemsize)
            _need(needs, zero.offload_param.nvme_path, f"{PARAM_KEY}.nvme_path", nbytes)
        self.swappers: dict[str, NvmeSwapper] = {}
        self.files: dict[str, MappedFile] = {}
        self.optimizer: OptimizerStaging | None = None
        self.shards: ShardStaging | None = None
        try:
            for directory, (key, nbytes, path) in needs.items():
                self.swappers[directory] = NvmeSwapper(
                    path, key=key, needed_nbytes=nbytes, rank=rank, aio=aio
                )
            self._allocate(
                zero, layout, compute_dtype, pin_memory, optimizer_in_files, params_in_files
            )
        except BaseException:  # leave no directory behind a refused shard
            _close(list(self.files.values()), list(self.swappers.values()))
            raise
        self._finalizer = weakref.finalize(
            self, _close, list(self.files.values()), list(self.swappers.values())
        )

    def _allocate(
        self,
        zero,
        layout: FlatLayout,
        compute_dtype: torch.dtype,
        pin_memory: bool,
        optimizer_in_files: bool,
        params_in_files: bool,
    ) -> None:
        """The file-backed tensors and their staging buffers."""
        if optimizer_in_files:
            path = zero.offload_optimizer.nvme_path
            for name in OPTIMIZER_FILES:
                self.files[name] = self._mapped(
                    f"{OPTIMIZER_KEY}.nvme_path", path, name, layout.optimizer_numel, torch.float32
                )
            ranges = {
                u.index: (u.optimizer_offset, u.optimizer_offset + u.optimizer_numel)
                for u in layout.units
                if u.optimizer_numel
            }
            files = tuple(self.files[name] for name in OPTIMIZER_FILES)
            count = zero.offload_optimizer.buffer_count
            self.optimizer = OptimizerStaging(files, ranges, count, pin_memory)
        if params_in_files:
            path = zero.offload_param.nvme_path
            key = f"{PARAM_KEY}.nvme_path"
            file = self._mapped(key, path, SHARD_FILE, layout.shard_numel, compute_dtype)
            self.files[SHARD_FILE] = file
            ranges = {
                u.index: (
                    u.shard_offset,
                    u.shard_offset + u.shard_numel,
                    u.shard_offset + u.optimizer_numel,
                )
                for u in layout.units
            }
            count = zero.offload_param.buffer_count
            resident = self.resident_shard_units
            self.shards = ShardStaging(file, ranges, count, pin_memory, resident)

    def __repr__(self) -> str:
        where = ", ".join(repr(s) for s in self.swappers.values())
        return f"FileResidence({sorted(self.files)}, {where})"

    def _mapped(
        self, key: str, nvme_path: str, name: str, numel: int, dtype: torch.dtype
    ) -> MappedFile:
        """A new mapped file in ``nvme_path``'s swapper; a disk that cannot hold it (other
        ranks or programs filled it since the check) is refused naming ``key``."""
        try:
            return MappedFile(self.swappers[os.path.realpath(nvme_path)], name, numel, dtype)
        except SwapIOError as error:
            raise SwapPathError(key, nvme_path, f"{error}") from error

    def holds(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        """The file-backed tensor of leaf ``name`` (zeros until written)."""
        return self.files[name].tensor

    @property
    def io_notes(self) -> list[str]:
        """Why a swapper runs without ``O_DIRECT`` (the filesystem refused it), if one does."""
        return [s.io_note for s in self.swappers.values() if s.io_note]

    def wait_writes(self) -> None:
        for staging in (self.optimizer, self.shards):
            if staging is not None:
                staging.wait_writes()

    def abort(self) -> None:
        for staging in (self.optimizer, self.shards):
            if staging is not None:
                staging.abort()

    def close(self) -> None:
        """Wait for transfers in flight, close the files and remove this run's directories.
        The leaves stay readable (the mappings outlive the files) until they are dropped."""
        self.abort()
        self._finalizer()


def _close(files: list[MappedFile], swappers: list[NvmeSwapper]) -> None:
    for file in files:
        file.close()
    for swapper in swappers:
        swapper.close()


def _need(needs: dict[str, list], path: str | None, key: str, nbytes: int) -> None:
    """Add ``nbytes`` to what directory ``path`` must hold (two keys may name one directory)."""
    entry = needs.setdefault(os.path.realpath(path or ""), [key, 0, path or ""])
    entry[1] += nbytes


def _check_buffer_count(key: str, block) -> None:
    if block.buffer_count < 2:
        raise ConfigError(
            key,
            f'must be at least 2 with device "nvme", got {block.buffer_count}: one staging '
            "buffer is read into while another is stepped or uploaded",
        )


def _aio_settings(config: Config) -> AioSettings:
    return AioSettings(**asdict(config.aio))
