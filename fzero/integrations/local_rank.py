"""Run a script with ``--local_rank=N`` appended after its path, as DeepSpeed's launcher does.

``python -m fzero.integrations.local_rank [--module] SCRIPT ARGS...`` runs ``SCRIPT ARGS...
--local_rank=$LOCAL_RANK`` in this process (``runpy``, the way ``python SCRIPT`` runs it), so
scripts written for ``deepspeed`` that read ``args.local_rank`` work under torchrun's agent.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    as_module = bool(argv) and argv[0] == "--module"
    if as_module:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m fzero.integrations.local_rank [--module] SCRIPT ARGS")
    target, rest = argv[0], argv[1:]
    local_rank = os.environ.get("LOCAL_RANK", "0")
    sys.argv = [target, f"--local_rank={local_rank}", *rest]
    if as_module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
