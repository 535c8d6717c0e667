"""fzero: ZeRO stages 0-3 for PyTorch, with every collective of a step written down first.

state = fzero.shard(model, stage=3, config=cfg)
state, metrics = fzero.train_step(state, batch)
"""

from __future__ import annotations

from fzero.api import full_state_dict, plan_schedule, shard
from fzero.config import Config
from fzero.state import NAMESPACE, ZeroState
from fzero.train import train_step

__all__ = [
    "NAMESPACE",
    "Config",
    "ZeroState",
    "full_state_dict",
    "plan_schedule",
    "shard",
    "train_step",
]
__version__ = "0.1.0"

from fzero.checkpoint import load, load_pretrained, save  # noqa: E402 - appended: checkpoints

__all__ += ["load", "load_pretrained", "save"]

from fzero.gathered import gathered  # noqa: E402 - appended: full parameters for a block

__all__ += ["gathered"]

from fzero.integrations.arguments import add_config_arguments  # noqa: E402 - DeepSpeed's flags
from fzero.integrations.initialize import initialize  # noqa: E402 - DeepSpeed's engine loop

__all__ += ["add_config_arguments", "initialize"]
