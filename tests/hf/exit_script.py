"""A 2-rank training script with Hugging Face models, launched under torchrun by
``test_clean_exit``: it ends without destroying its process group, as many scripts do.

python -m torch.distributed.run --nproc_per_node 2 tests/hf/exit_script.py MODELS MODE
MODE ``user``: the script starts gloo itself (``init_process_group``); ``fzero``: through
``fzero.collectives.init_from_env``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging  # noqa: E402

import fzero  # noqa: E402
from fzero.collectives import init_from_env  # noqa: E402


def main() -> None:
    models, mode = int(sys.argv[1]), sys.argv[2]
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    if mode == "user":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    else:
        rank, _, _ = init_from_env()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    states = [fzero.shard(GPT2LMHeadModel(config), stage=3) for _ in range(models)]
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(rank))
    for index, state in enumerate(states):
        for _ in range(2):
            state, metrics = fzero.train_step(state, {"input_ids": ids, "labels": ids})
        states[index] = state
    print(f"rank {rank} trained {models} models, last loss {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
