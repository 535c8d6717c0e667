"""Sharded checkpoints: every rank writes its own shard, and any world size and stage reads it.

``save(state, root)`` writes ``root/step-<n>/`` (one safetensors file per rank, a manifest, and
last a commit record holding the manifest's sha256) and points ``root/latest`` at it;
``load(root, model)`` shards a fresh model and fills it from the newest complete checkpoint,
resharding when the world size or stage changed. A save that dies in any window leaves the
newest complete checkpoint loadable (``publish.py``, ``locate.py``). ``python -m fzero.checkpoint
consolidate CKPT OUT`` writes the full model; ``info CKPT`` says what a checkpoint holds.
``load_pretrained(folder, model)`` fills the shards from a Hugging Face checkpoint folder.
See docs/checkpoints.md.
"""

from __future__ import annotations

from fzero.checkpoint.consolidate import consolidate, describe
from fzero.checkpoint.loading import load, load_into
from fzero.checkpoint.locate import open_checkpoint
from fzero.checkpoint.manifest import Checkpoint
from fzero.checkpoint.pretrained import load_pretrained
from fzero.checkpoint.refresh import refresh_parameters
from fzero.checkpoint.saving import load_data_state, save

__all__ = [
    "Checkpoint",
    "consolidate",
    "describe",
    "load",
    "load_data_state",
    "load_into",
    "load_pretrained",
    "open_checkpoint",
    "refresh_parameters",
    "save",
]
