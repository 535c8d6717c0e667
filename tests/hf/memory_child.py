"""Measure a process's host memory peak over one fzero operation (run as a child process, so
that nothing before it counts): ``python tests/hf/memory_child.py MODE FOLDER ...``.

- ``load CONFIG_DIR CHECKPOINT_DIR WORLD``: build the model from CONFIG_DIR on the meta device,
  shard it as rank 0 of WORLD (simulated: the other ranks do not exist), ``load_pretrained``.
- ``consolidate CHECKPOINT OUT MAX_SHARD_BYTES CONFIG_DIR``: ``consolidate`` with hf_config.

Before the baseline, the same operation runs once on a one-layer model of the same config
(``warm_up``): first-use costs of the runtime (lazy imports, thread pools, allocator arenas)
then fall outside the measurement, which differ between environments by several MiB and say
nothing about the operation; what the warm-up keeps is a one-layer model's worth.

Prints one line ``RESULT {json}``: the resident set before (after imports and the meta model),
and the peak growth over it in bytes: the kernel's high-water mark (``VmHWM``), reset just
before the operation by writing 5 to ``/proc/self/clear_refs``. Reads use ``os.preadv``, so file
pages sit in the page cache, not in the process's resident set.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import transformers  # noqa: E402

import fzero  # noqa: E402
from fzero.checkpoint import consolidate  # noqa: E402
from fzero.checkpoint.hf_export import read_hf_config  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as file:
        line = next(x for x in file if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def warm_up(config, mode: str, world: int) -> None:
    """Run the measured operation once on a one-layer model of ``config`` (see the docstring)."""
    import copy
    import gc
    import tempfile

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    with tempfile.TemporaryDirectory() as folder:
        model = transformers.AutoModelForCausalLM.from_config(small)
        if mode == "load":
            model.save_pretrained(folder)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(small)
            fzero.load_pretrained(folder, fzero.shard(model, stage=3, simulate_world_size=world))
        else:
            fzero.save(fzero.shard(model, stage=3), f"{folder}/ckpt")
            small.save_pretrained(f"{folder}/source")
            consolidate(f"{folder}/ckpt", f"{folder}/out", hf_config=f"{folder}/source")
        del model
    gc.collect()


def main() -> None:
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "load":
        config_dir, checkpoint, world = sys.argv[2], sys.argv[3], int(sys.argv[4])
        config = transformers.AutoConfig.from_pretrained(config_dir)
        warm_up(config, mode, world)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        before = resident_bytes()
        reset_peak()
        state = fzero.shard(model, stage=3, simulate_world_size=world)
        after_shard = peak_bytes() - before
        fzero.load_pretrained(checkpoint, state)
        result = {"before": before, "shard_peak": after_shard, "peak": peak_bytes() - before}
        result["state_nbytes"] = sum(
            t.numel() * t.element_size() for t in (state.master, state.exp_avg, state.exp_avg_sq)
        )
    else:
        checkpoint, out, max_shard, config_dir = sys.argv[2:6]
        read_hf_config(config_dir)  # transformers' lazy imports are not the consolidation's
        warm_up(transformers.AutoConfig.from_pretrained(config_dir), mode, 1)
        before = resident_bytes()
        reset_peak()
        consolidate(checkpoint, out, max_shard_bytes=int(max_shard), hf_config=config_dir)
        result = {"before": before, "peak": peak_bytes() - before}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
