"""The top-level ``aio`` block of ``fzero.Config``: how NVMe offload's swap files are read and
written (DeepSpeed: ``deepspeed/runtime/swap_tensor/aio_config.py``; defaults are DeepSpeed's).

The offload side (``fzero/offload/aio.py``, ``AioSettings``) checks the values when it builds
the swapper, at ``shard`` time under ``"nvme"``; what each key does there is in its docstring
and ``docs/config.md``. Without NVMe offload the block is read and has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzero.errors import ConfigError

ALIGNMENT_NBYTES = 4096  # direct I/O moves whole 4096-byte blocks


@dataclass(frozen=True)
class AioConfig:
    """``aio``: ``block_size`` bytes per request; ``queue_depth`` x ``thread_count`` (newer
    DeepSpeed: ``intra_op_parallelism``) requests in flight; ``single_submit`` and
    ``overlap_events`` are libaio batching choices with nothing to choose in fzero's worker
    threads; ``io_backend`` ``"async_io"`` or ``"posix"``; ``use_gds`` must stay false."""

    block_size: int = 1 << 20
    queue_depth: int = 8
    thread_count: int = 1
    intra_op_parallelism: int | None = None
    single_submit: bool = False
    overlap_events: bool = True
    io_backend: str = "async_io"
    use_gds: bool = False

    def validate(self, path: str = "aio") -> None:
        for name in ("block_size", "queue_depth", "thread_count", "intra_op_parallelism"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}.{name}", f"must be a positive integer, got {value!r}")
        if self.block_size % ALIGNMENT_NBYTES:
            raise ConfigError(
                f"{path}.block_size",
                f"must be a multiple of {ALIGNMENT_NBYTES} bytes for direct I/O, got "
                f"{self.block_size}",
            )
        if self.io_backend not in ("async_io", "posix"):
            raise ConfigError(
                f"{path}.io_backend", f'must be "async_io" or "posix", got {self.io_backend!r}'
            )
        if self.use_gds:
            raise ConfigError(
                f"{path}.use_gds",
                "GPUDirect Storage is not implemented: fzero swaps through host memory "
                "(docs/offload.md says why); set it to false",
            )
