"""Hugging Face Llama benchmark: fzero stage 3 with and without activation checkpointing next to
FSDP2 with the same checkpointing, the guide's Trainer next to ``train_step``, and
``load_pretrained`` of a multi-GB safetensors folder, on a ~1.1B Llama built from its config.

    python benchmarks/hf_llama.py --json out/llama.json     # on a GPU: every row
    python benchmarks/hf_llama.py --cpu-smoke                # CI: a tiny Llama on the CPU

Rows (each in a process of its own, so that its peak memory and CUDA context are its own):
- ``fzero:3``, ``fzero:3+ckpt``, ``fsdp2``, ``fsdp2+ckpt``: AdamW (lr 3e-4, betas 0.9/0.95,
  weight decay 0.1), clipping 1.0, bf16 compute with fp32 master weights and reductions;
  ``+ckpt`` is ``model.gradient_checkpointing_enable()`` (non-reentrant) on every decoder
  layer. FSDP2: ``fully_shard`` on each ``LlamaDecoderLayer`` then the root, fused AdamW.
- ``trainer:3+ckpt``: ``fzero.integrations.transformers.Trainer`` with the guide's config
  (examples/ds_config_hf.json, "auto" values from ``TrainingArguments``), stage 3, bf16,
  ``gradient_checkpointing=True``; ``train_step:3+ckpt``: ``fzero.shard`` with the config that
  Trainer resolves and ``fzero.train_step`` over the Trainer's own dataloader. The shells'
  cost is the ratio of the two.
- ``load_pretrained``: the model is saved once (fp32, ``max_shard_size`` 1GB, so sharded with
  an index) into a temporary folder, then a child builds it on the meta device, shards it at
  stage 3 and loads the folder; reported: seconds, the host's peak resident-set growth over
  shard + load against the folder's size, and a check that loaded tensors equal the files'.
  The folder was just written, so its pages are mostly in the page cache (GB/s is not the
  disk's); ``--folder-parent`` picks where it goes (its filesystem type is in the row).

Per training row: tokens/s, MFU (6 N + 12 L h s FLOPs per token, --peak-tflops), step time,
the GPU peak over the timed steps (allocated; set-up and warm-up excluded), and the ratios of
tokens/s and peak to the FSDP2 row with the same checkpointing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from children import child_args, importable, print_result, run_child  # noqa: E402
from hf_llama_rows import Sizes  # noqa: E402

STEP_ROWS = ["fzero:3", "fzero:3+ckpt", "fsdp2", "fsdp2+ckpt"]
TRAINER_ROWS = ["trainer:3+ckpt", "train_step:3+ckpt"]
ALL_ROWS = [*STEP_ROWS, *TRAINER_ROWS, "load_pretrained"]
SMOKE_SIZES = Sizes(
    hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256, seq_len=32, batch=2
)


def _child(args, sizes: Sizes) -> None:
    from hf_llama_load import run_load_row
    from hf_llama_rows import run_step_row, run_trainer_row

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if args.one in STEP_ROWS:
        row = run_step_row(args.one, sizes, args.steps, args.warmup, device)
    elif args.one in TRAINER_ROWS:
        row = run_trainer_row(args.one, sizes, args.steps, args.warmup, device)
    else:
        row = run_load_row(sizes, args.folder, device)
    row["sizes"] = dataclasses.asdict(sizes)
    row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print_result(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=ALL_ROWS, choices=ALL_ROWS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    for field in dataclasses.fields(Sizes):
        option = "--" + field.name.replace("_", "-")
        parser.add_argument(option, type=int, default=field.default, help=f"model: {field.name}")
    parser.add_argument("--max-shard-size", default="1GB", help="load_pretrained's folder")
    parser.add_argument("--folder-parent", help="where the folder is written (default: $TMPDIR)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny Llama, CPU, 2 steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:  # the Trainer's timer starts at the end of step `warmup`
        parser.error("--warmup must be at least 1")
    if args.cpu_smoke:
        sizes, args.steps, args.warmup = SMOKE_SIZES, 2, 1
    else:
        sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    if args.one:
        _child(args, sizes)
        return
    missing = [name for name in ("transformers", "accelerate") if not importable(name)]
    if missing:
        sys.exit(f"hf_llama.py needs {' and '.join(missing)}: pip install -e '.[hf]'")
    scratch = None  # the load_pretrained row's folder lives under it; removed at the end
    rows = []
    try:
        for impl in args.impls:
            command = [
                sys.executable,
                *child_args(__file__, impl, "llama", args.steps, args.warmup),
                *(
                    f"--{f.name.replace('_', '-')}={getattr(sizes, f.name)}"
                    for f in dataclasses.fields(Sizes)
                ),
            ]
            command += ["--cpu-smoke"] if args.cpu_smoke else []
            if impl == "load_pretrained":
                if scratch is None:
                    scratch = tempfile.mkdtemp(prefix="hf_llama_", dir=args.folder_parent)
                    _save_folder(sizes, os.path.join(scratch, "model"), args)
                command += ["--folder", os.path.join(scratch, "model")]
            row = run_child(command, impl)
            rows.append(row or {"impl": impl, "failed": True})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(_table(rows, args.peak_tflops))
    print("\n".join(_summary(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(r.get("failed") for r in rows):
        sys.exit(1)


def _save_folder(sizes: Sizes, folder: str, args) -> None:
    """The model saved once, in the parent, for the load_pretrained child."""
    from hf_llama_load import save_folder

    torch.set_num_threads(os.cpu_count() or 1)
    nbytes = save_folder(sizes, folder, "10KB" if args.cpu_smoke else args.max_shard_size)
    print(f"saved {nbytes / 2**30:.2f} GiB to {folder}", flush=True)


def _baseline(row: dict, rows: list[dict]) -> dict | None:
    """The FSDP2 row with the same checkpointing (``trainer``'s is ``train_step``)."""
    impl = row["impl"]
    if impl.startswith("trainer"):
        name = "train_step:3+ckpt"
    else:
        name = "fsdp2+ckpt" if impl.endswith("+ckpt") else "fsdp2"
    return next((r for r in rows if r["impl"] == name and not r.get("failed")), None)


def _ratio(row: dict, base: dict | None, key: str) -> str:
    if base is None or row.get(key) is None or not base.get(key):
        return "-"
    return f"{row[key] / base[key]:.3f}x"


def _summary(rows: list[dict]) -> list[str]:
    """What the two issues ask of the rows: checkpointing's memory saved and time cost for
    fzero and FSDP2, and the Trainer's tokens/s as a fraction of train_step's."""
    found = {r["impl"]: r for r in rows if not r.get("failed") and "tokens_per_s" in r}
    lines = []
    for kind in ("fzero:3", "fsdp2"):
        plain, checkpointed = found.get(kind), found.get(kind + "+ckpt")
        if plain and checkpointed and plain["peak_gib"] is not None:
            lines.append(
                f"{kind} checkpointing: peak {plain['peak_gib']:.2f} -> "
                f"{checkpointed['peak_gib']:.2f} GiB, tokens/s "
                f"x{checkpointed['tokens_per_s'] / plain['tokens_per_s']:.3f}"
            )
    trainer, loop = found.get("trainer:3+ckpt"), found.get("train_step:3+ckpt")
    if trainer and loop:
        ratio = trainer["tokens_per_s"] / loop["tokens_per_s"]
        lines.append(
            f"Trainer / train_step tokens/s: {ratio:.3f} (the shells' cost: {1 - ratio:+.1%})"
        )
    return lines


def _table(rows: list[dict], peak_tflops: float) -> str:
    lines = [
        "| impl | tokens/s | MFU | step ms | peak GiB | tok/s vs base | peak vs base | base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("failed") or "tokens_per_s" not in row:
            continue
        base = _baseline(row, rows)
        mfu = row["tokens_per_s"] * row["flops_per_token"] / (peak_tflops * 1e12)
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append(
            f"| {row['impl']} | {row['tokens_per_s'] / 1e3:,.2f}k | {100 * mfu:.1f}% | "
            f"{row['step_ms']:.1f} | {peak} | {_ratio(row, base, 'tokens_per_s')} | "
            f"{_ratio(row, base, 'peak_gib')} | {base['impl'] if base else '-'} |"
        )
    for row in rows:
        if row["impl"] == "load_pretrained" and not row.get("failed"):
            lines += [
                "",
                "| load_pretrained | seconds | folder GiB | GB/s | host peak growth GiB | "
                "x folder | host before GiB | ru_maxrss GiB | checked |",
                "|---|---|---|---|---|---|---|---|---|",
                f"| stage 3, 1 rank, {row['folder_filesystem']} | {row['seconds']:.1f} | "
                f"{row['folder_gib']:.2f} | "
                f"{row['read_gb_per_s']:.2f} | {row['host_peak_delta_gib']:.2f} | "
                f"{row['host_peak_delta_gib'] / row['folder_gib']:.3f} | "
                f"{row['host_before_gib']:.2f} | {row['host_ru_maxrss_gib']:.2f} | "
                f"{len(row['checked'])} tensors equal |",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
