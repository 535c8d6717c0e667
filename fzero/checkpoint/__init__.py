"""Sharded checkpoints: every rank writes its own shard, and any world size and stage reads it.

``save(state, root)`` writes ``root/step-<n>/`` (one safetensors file per rank and a manifest,
written last) and points ``root/latest`` at it; ``load(root, model)`` shards a fresh model and
fills it, resharding when the world size or stage changed. ``python -m fzero.checkpoint
consolidate CKPT OUT`` writes the full model; ``info CKPT`` says what a checkpoint holds.
See docs/checkpoints.md.
"""

from __future__ import annotations

from fzero.checkpoint.consolidate import consolidate, describe
from fzero.checkpoint.loading import load, load_into
from fzero.checkpoint.manifest import Checkpoint, open_checkpoint
from fzero.checkpoint.refresh import refresh_parameters
from fzero.checkpoint.saving import load_data_state, save

__all__ = [
    "Checkpoint",
    "consolidate",
    "describe",
    "load",
    "load_data_state",
    "load_into",
    "open_checkpoint",
    "refresh_parameters",
    "save",
]
