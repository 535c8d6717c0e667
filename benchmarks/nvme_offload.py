"""NVMe offload during training: the swap files' read and write GB/s while fzero trains, beside
``dd`` with direct I/O on the same directory in the same run, and the step time beside CPU
offload of the same configuration (the GPT of examples/gpt.py).

    python benchmarks/nvme_offload.py --dir /local_nvme --model 255m    # on the GPU machine
    python benchmarks/nvme_offload.py --cpu-smoke                       # CI: tiny model on CPU

A step moves the optimizer state through the disk twice (12 bytes per parameter each way), so
at 1.5 GB/s the 255m model's NVMe step takes about 2 s and the 1.4b model's about 20 s: mind
the device machine's per-command limit with ``--model 1.4b`` (run fewer ``--impls``).

Each configuration runs in a process of its own (``step.run_one`` times it). Implementations:
``fzero:<stage>+<device>`` with the optimizer offloaded to ``cpu`` or ``nvme``, and
``+param`` for the parameter shards offloaded to the same device (stage 3). Over the timed
steps every request the swapper's worker threads run is timed; a direction's GB/s is its bytes
over the time at least one of its requests was in flight (the union of their intervals), so it
is the disk's rate while the step does I/O, not diluted by the compute between. ``dd`` then
writes and reads a file of the bytes one timed step moved in one direction (64 MiB to 4 GiB) with
``oflag=direct`` / ``iflag=direct`` in the same directory; the ratios are swapper / dd.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from children import print_result, run_child  # noqa: E402
from nvme_swap import time_dd  # noqa: E402
from offload import fzero_config  # noqa: E402
from step import run_one as step_run_one  # noqa: E402

DEFAULT_IMPLS = [
    "fzero:2+cpu",
    "fzero:2+nvme",
    "fzero:3+cpu",
    "fzero:3+nvme",
    "fzero:3+cpu+param",
    "fzero:3+nvme+param",
]
DD_MIN_NBYTES, DD_MAX_NBYTES = 64 << 20, 4 << 30


class RequestLog:
    """Times every request of the swappers it is attached to (their worker threads call it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, int, float, float]] = []  # kind, bytes, start, end
        self.recording = False

    def attach(self, swapper) -> None:
        request = swapper._request  # each request runs here, on a worker thread

        def timed(kind, fd, data, offset, length, at):
            start = time.perf_counter()
            request(kind, fd, data, offset, length, at)
            if self.recording:
                with self.lock:
                    self.requests.append((kind, length, start, time.perf_counter()))

        swapper._request = timed

    def rates(self, steps: int) -> dict:
        out = {}
        for kind in ("read", "write"):
            spans = sorted((s, e) for k, _, s, e in self.requests if k == kind)
            nbytes = sum(n for k, n, _, _ in self.requests if k == kind)
            busy, end = 0.0, float("-inf")
            for start, stop in spans:  # the union of the intervals
                busy += max(0.0, stop - max(start, end))
                end = max(end, stop)
            out[f"{kind}_nbytes_per_step"] = nbytes // max(steps, 1)
            out[f"{kind}_gb_per_s"] = nbytes / busy / 1e9 if busy else 0.0
        return out


def make_step(impl: str, model, device: torch.device, directory: str):
    import fzero

    kind, _, rest = impl.partition(":")
    stage, device_name, *options = rest.split("+")
    if kind != "fzero" or device_name not in ("cpu", "nvme"):
        raise ValueError(f"unknown implementation {impl!r}")
    # The rows of benchmarks/offload.py with the same options, so both benchmarks time one config.
    nvme = device_name == "nvme"
    rows = {"opt", *options, *(["nvme"] if nvme else [])}
    on_cuda = device.type == "cuda"
    config = fzero_config(int(stage), rows, on_cuda, on_cuda, directory if nvme else None)
    if nvme and "param" in options:  # every parameter shard through the file, none kept on the host
        config["zero_optimization"]["offload_param"]["max_in_cpu"] = 0
    box = {"state": fzero.shard(model, config=config)}
    files = box["state"].runtime.executor.host_optimizer.files
    log = RequestLog()
    for swapper in files.swappers.values() if files is not None else ():
        log.attach(swapper)
    timed = {"steps": 0}

    def step(batch):
        box["state"], metrics = fzero.train_step(box["state"], batch)
        timed["steps"] += log.recording
        return metrics["loss"]

    def start_timing():
        log.recording = True

    def extra():
        if files is None:
            return {}
        torch.cuda.synchronize() if device.type == "cuda" else None
        log.recording = False
        swappers = list(files.swappers.values())
        result = log.rates(timed["steps"])
        result["mode"] = "O_DIRECT" if swappers[0].direct else f"buffered: {swappers[0].io_note}"
        moved = result["read_nbytes_per_step"] + result["write_nbytes_per_step"]
        dd_nbytes = min(max(DD_MIN_NBYTES, moved // 2 // (1 << 20) * (1 << 20)), DD_MAX_NBYTES)
        result["dd"] = time_dd(directory, dd_nbytes, swappers[0].aio.block_size)
        for kind in ("read", "write"):
            theirs = result["dd"].get(f"{kind}_gb_per_s")
            result[f"{kind}_over_dd"] = result[f"{kind}_gb_per_s"] / theirs if theirs else None
        return result

    step.start_timing = start_timing
    return step, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="a directory on the NVMe disk (nvme_path)")
    parser.add_argument("--model", default="255m")
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, a temp dir")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_smoke:
        args.model, args.steps, args.warmup = "tiny", 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.one:
        make = lambda impl, model, device: make_step(impl, model, device, args.dir)  # noqa: E731
        print_result(step_run_one(args.one, args.model, args.steps, args.warmup, device, make))
        return
    if not args.dir and not args.cpu_smoke:
        parser.error("--dir is required (a directory on the NVMe disk)")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        rows = []
        for impl in args.impls:
            command = [sys.executable, __file__, "--one", impl, "--model", args.model]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--dir", scratch] + (["--cpu-smoke"] if args.cpu_smoke else [])
            row = run_child(command, impl)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _table(rows: list[dict]) -> str:
    step_ms = {r["impl"]: r["step_ms"] for r in rows}
    lines = [
        "| impl | step ms | x cpu | read GB/s | dd read | write GB/s | dd write | I/O MiB/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        baseline = r["impl"].replace("+nvme", "+cpu")  # the same with CPU offload
        base = step_ms.get(baseline) if baseline != r["impl"] else None
        ratio = f"{r['step_ms'] / base:.2f}" if base else "-"
        if "dd" not in r:
            lines.append(f"| {r['impl']} | {r['step_ms']:.1f} | {ratio} | | | | | |")
            continue
        dd = r["dd"]
        moved = (r["read_nbytes_per_step"] + r["write_nbytes_per_step"]) / 2**20
        lines.append(
            f"| {r['impl']} | {r['step_ms']:.1f} | {ratio} | {r['read_gb_per_s']:.2f} | "
            f"{dd.get('read_gb_per_s', float('nan')):.2f} | {r['write_gb_per_s']:.2f} | "
            f"{dd.get('write_gb_per_s', float('nan')):.2f} | {moved:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
