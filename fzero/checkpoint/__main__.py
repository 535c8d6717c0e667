"""``python -m fzero.checkpoint``: inspect and consolidate checkpoints without the training job.

python -m fzero.checkpoint info CKPT
python -m fzero.checkpoint consolidate CKPT OUT [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import sys

from fzero.checkpoint.consolidate import DTYPES, consolidate, describe, parse_size
from fzero.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fzero.checkpoint",
        description="Inspect and consolidate fzero checkpoints without the training job.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print what a checkpoint holds")
    info.add_argument(
        "checkpoint", help="a step-* directory, or a root (its newest complete checkpoint)"
    )
    merge = commands.add_parser("consolidate", help="write the full model as safetensors")
    merge.add_argument(
        "checkpoint", help="a step-* directory, or a root (its newest complete checkpoint)"
    )
    merge.add_argument("out", help="a new directory for the safetensors files")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters' dtype")
    merge.add_argument(
        "--max-shard-size", default="5GB", help="split into files of at most this (5GB)"
    )
    merge.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.checkpoint))
        else:
            files = consolidate(
                args.checkpoint,
                args.out,
                dtype=args.dtype,
                max_shard_bytes=parse_size(args.max_shard_size),
                verify=not args.no_verify,
            )
            for path in files:
                print(path)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
