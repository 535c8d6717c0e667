"""fzero: ZeRO stages 0-3 for PyTorch, with every collective of a step written down first.

state = fzero.shard(model, stage=3, config=cfg)
state, metrics = fzero.train_step(state, batch)
"""

from __future__ import annotations

from fzero.api import full_state_dict, shard
from fzero.config import Config
from fzero.state import NAMESPACE, ZeroState
from fzero.train import train_step

__all__ = ["NAMESPACE", "Config", "ZeroState", "full_state_dict", "shard", "train_step"]
__version__ = "0.1.0"

from fzero.checkpoint import load, save  # noqa: E402 - appended: sharded checkpoints

__all__ += ["load", "save"]

from fzero.integrations.arguments import add_config_arguments  # noqa: E402 - DeepSpeed's flags
from fzero.integrations.initialize import initialize  # noqa: E402 - DeepSpeed's engine loop

__all__ += ["add_config_arguments", "initialize"]
