"""The ``load_pretrained`` row of benchmarks/hf_llama.py: the folder the parent saves once, and
the child that shards the model from the meta device and fills it from that folder, measuring
the host's resident-set growth over it."""

from __future__ import annotations

import os
import resource
import time

import torch
from hf_llama_rows import Sizes, build_model, llama_config, synchronize
from step import _optimizer_config


def save_folder(sizes: Sizes, folder: str, max_shard_size: str) -> int:
    """Write the model (fp32, seed 0) as ``save_pretrained`` does, sharded with an index above
    ``max_shard_size``; returns the folder's size in bytes."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    build_model(sizes, "cpu").save_pretrained(folder, max_shard_size=max_shard_size)
    return sum(entry.stat().st_size for entry in os.scandir(folder))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water_bytes() -> int:
    """The resident set's high-water mark since the last ``/proc/self/clear_refs`` reset."""
    with open("/proc/self/status") as file:
        line = next(x for x in file if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def filesystem_of(path: str) -> str:
    """The type of the filesystem ``path`` is on (``ext4``, ``tmpfs``, ...), from /proc/mounts."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/mounts") as file:
        for line in file:
            _, mount, fstype, *_ = line.split()
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def run_load_row(sizes: Sizes, folder: str, device) -> dict:
    """load_pretrained: the model on the meta device, ``fzero.shard`` at stage 3 (each unit
    initialised on ``device``), then ``fzero.load_pretrained``. The host peak is the resident
    set's high-water mark over shard + load, reset just before (``ru_maxrss`` is the process's
    lifetime peak, reported beside it). Checks a few loaded tensors against the files."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    import fzero

    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context's host memory is not the load's
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(sizes))
    config = {"bf16": {"enabled": device.type == "cuda"}, "optimizer": _optimizer_config()}
    before = _resident_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current resident set
        peak_source = "VmHWM"
    except OSError:  # not writable here: the lifetime peak, an upper bound of the load's
        peak_source = "ru_maxrss"
    start = time.perf_counter()
    state = fzero.shard(model, stage=3, config=config, device=device)
    shard_seconds = time.perf_counter() - start
    state = fzero.load_pretrained(folder, state)
    synchronize(device)
    seconds = time.perf_counter() - start
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = _high_water_bytes() if peak_source == "VmHWM" else lifetime_peak
    folder_nbytes = sum(entry.stat().st_size for entry in os.scandir(folder))
    last = sizes.layers - 1
    names = ["model.embed_tokens.weight", f"model.layers.{last}.mlp.down_proj.weight"]
    names.append("lm_head.weight")
    checked = []
    with fzero.gathered(state, [model.get_parameter(name) for name in names]):
        for name in names:
            loaded = model.get_parameter(name)[-3:]
            saved = _read_saved(folder, name, safe_open).to(loaded.device, loaded.dtype)
            if not torch.equal(loaded, saved):
                raise RuntimeError(f"load_pretrained: {name} differs from {folder}'s tensor")
            checked.append(name)
    return {
        "impl": "load_pretrained",
        "seconds": seconds,
        "shard_seconds": shard_seconds,
        "folder_gib": folder_nbytes / 2**30,
        "read_gb_per_s": folder_nbytes / (seconds - shard_seconds) / 1e9,  # load_pretrained's
        "host_before_gib": before / 2**30,
        "host_peak_delta_gib": (peak - before) / 2**30,
        "host_peak_source": peak_source,
        "host_ru_maxrss_gib": lifetime_peak / 2**30,
        "folder_filesystem": filesystem_of(folder),
        "sharded_with_index": os.path.isfile(os.path.join(folder, "model.safetensors.index.json")),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "checked": checked,
    }


def _read_saved(folder: str, name: str, safe_open) -> torch.Tensor:
    """The last three rows of the stored tensor ``name`` (read from its file alone)."""
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".safetensors"):
            with safe_open(os.path.join(folder, entry), "pt") as file:
                if name in file.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    stored = file.get_slice(name)
                    rows = stored.get_shape()[0]
                    return stored[rows - 3 : rows]
    raise KeyError(f"{name} is in no .safetensors file of {folder}")
