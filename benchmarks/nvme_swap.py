"""Read and write bandwidth of fzero's NVMe swapper against ``dd`` with direct I/O, same disk.

    python benchmarks/nvme_swap.py --dir /local_nvme            # 4 GiB in 8 buffers
    python benchmarks/nvme_swap.py --dir /tmp --gib 1 --buffers 4 --thread-count 2
    python benchmarks/nvme_swap.py --cpu-smoke                  # CI: 16 MiB under a temp dir

The swapper writes ``--buffers`` aligned host buffers (``aligned_empty``) as separate files, all
in flight at once, then reads them back; GB/s counts the buffers' bytes over the wall time from
the first request to the last completion. ``dd`` then writes one file of the same total size
with ``oflag=direct`` (``bs`` = the swapper's block size) and reads it with ``iflag=direct``.
Direct I/O on both sides, so neither is served from the page cache; the ratio is swapper / dd.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from fzero.offload.aio import AioSettings, aligned_empty, swap_nbytes  # noqa: E402
from fzero.offload.swap import NvmeSwapper  # noqa: E402


def time_swapper(directory: str, total_nbytes: int, buffers: int, aio: AioSettings) -> dict:
    per_buffer = total_nbytes // buffers // 4096 * 4096
    tensors = [aligned_empty(per_buffer, torch.uint8).random_(0, 255) for _ in range(buffers)]
    swap = NvmeSwapper(
        directory,
        key="--dir",
        needed_nbytes=swap_nbytes([per_buffer] * buffers, writes_in_flight=buffers),
        aio=aio,
    )
    start = time.perf_counter()
    for handle in [swap.write(f"buffer{i}", t) for i, t in enumerate(tensors)]:
        handle.wait()
    write_seconds = time.perf_counter() - start
    # Touched first, as reused buffers are: the first touch of fresh pages is not I/O time.
    targets = [aligned_empty(per_buffer, torch.uint8).zero_() for _ in range(buffers)]
    start = time.perf_counter()
    for handle in [swap.read(f"buffer{i}", t) for i, t in enumerate(targets)]:
        handle.wait()
    read_seconds = time.perf_counter() - start
    exact = all(torch.equal(a, b) for a, b in zip(tensors, targets))
    mode = "O_DIRECT" if swap.direct else f"buffered: {swap.io_note}"
    swap.close()
    nbytes = per_buffer * buffers
    return {
        "nbytes": nbytes,
        "write_gb_per_s": nbytes / write_seconds / 1e9,
        "read_gb_per_s": nbytes / read_seconds / 1e9,
        "round_trip_exact": exact,
        "mode": mode,
    }


def time_dd(directory: str, total_nbytes: int, block_nbytes: int) -> dict:
    """``dd`` write then read of one file with direct I/O; its own GB/s from wall time."""
    path = Path(directory) / "fzero-dd-probe"
    count = total_nbytes // block_nbytes
    results = {}
    try:
        for kind, arguments in (
            ("write", ["if=/dev/zero", f"of={path}", "oflag=direct", "conv=fsync"]),
            ("read", [f"if={path}", "of=/dev/null", "iflag=direct"]),
        ):
            start = time.perf_counter()
            done = subprocess.run(
                ["dd", *arguments, f"bs={block_nbytes}", f"count={count}"],
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                results[f"{kind}_error"] = done.stderr.strip()[-300:]
                continue
            results[f"{kind}_gb_per_s"] = count * block_nbytes / seconds / 1e9
            reported = re.search(r"([\d.]+) ([GM])B/s", done.stderr)
            if reported:
                scale = 1.0 if reported[2] == "G" else 1e-3
                results[f"{kind}_dd_reported_gb_per_s"] = float(reported[1]) * scale
    finally:
        path.unlink(missing_ok=True)
    return results


def main(directory: str, total_nbytes: int, buffers: int, aio: AioSettings, json_path) -> dict:
    swap = time_swapper(directory, total_nbytes, buffers, aio)
    dd = time_dd(directory, swap["nbytes"], aio.block_size)
    print(
        f"{swap['nbytes'] / 2**30:.2f} GiB in {buffers} buffers under {directory}; swapper "
        f"{swap['mode']}, block {aio.block_size}, {aio.requests_in_flight} requests in flight"
    )
    print("| | swapper GB/s | dd GB/s | swapper / dd |\n| --- | ---: | ---: | ---: |")
    for kind in ("write", "read"):
        ours, theirs = swap[f"{kind}_gb_per_s"], dd.get(f"{kind}_gb_per_s")
        ratio = f"{ours / theirs:.2f}" if theirs else dd.get(f"{kind}_error", "n/a")
        print(f"| {kind} | {ours:.2f} | {theirs or float('nan'):.2f} | {ratio} |")
    if not swap["round_trip_exact"]:
        raise SystemExit("the swapper read back different bytes than it wrote")
    result = {"directory": directory, "buffers": buffers, "aio": aio.__dict__, **swap, "dd": dd}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="a directory on the disk to measure")
    parser.add_argument("--gib", type=float, default=4.0, help="total GiB written and read")
    parser.add_argument("--buffers", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=1 << 20)
    parser.add_argument("--queue-depth", type=int, default=8)
    parser.add_argument("--thread-count", type=int, default=1)
    parser.add_argument("--cpu-smoke", action="store_true", help="16 MiB under a temp dir")
    parser.add_argument("--json", help="write the result to this file")
    args = parser.parse_args()
    settings = AioSettings(args.block_size, args.queue_depth, args.thread_count)
    if args.cpu_smoke:
        with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
            main(scratch, 16 << 20, 4, settings, args.json)
    elif not args.dir:
        parser.error("--dir is required (a directory on the disk to measure)")
    else:
        main(args.dir, int(args.gib * 2**30), args.buffers, settings, args.json)
