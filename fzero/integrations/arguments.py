"""``fzero.add_config_arguments``: DeepSpeed's command-line config flags on a user's parser.

DeepSpeed's ``add_config_arguments`` adds a "DeepSpeed" group with ``--deepspeed`` (a flag for
user code), ``--deepspeed_config PATH`` and the deprecated ``--deepscale`` /
``--deepscale_config PATH``. This adds the same flags plus ``--fzero PATH``. ``--deepspeed``
also takes an optional path, so the Hugging Face habit ``--deepspeed ds_config.json`` works too.
``config_path_from_args`` reads the one config path the flags name.
"""

from __future__ import annotations

import argparse
from typing import Any

from fzero.errors import ConfigError

# (attribute, flag) pairs that can name a config file, in the order they are reported.
CONFIG_PATH_FLAGS = (
    ("fzero", "--fzero"),
    ("deepspeed_config", "--deepspeed_config"),
    ("deepspeed", "--deepspeed"),
    ("deepscale_config", "--deepscale_config"),
)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--fzero``, ``--deepspeed``, ``--deepspeed_config``, ``--deepscale`` and
    ``--deepscale_config`` to ``parser`` (in a group named "fzero"); returns ``parser``."""
    group = parser.add_argument_group("fzero", "fzero (DeepSpeed-compatible) configuration")
    group.add_argument(
        "--fzero", default=None, type=str, help="fzero / DeepSpeed JSON configuration file"
    )
    group.add_argument(
        "--deepspeed",
        default=False,
        nargs="?",
        const=True,
        help="enable flag for user code (as in DeepSpeed); may also be given a config path",
    )
    group.add_argument(
        "--deepspeed_config", default=None, type=str, help="DeepSpeed JSON configuration file"
    )
    group.add_argument(
        "--deepscale", default=False, action="store_true", help="deprecated form of --deepspeed"
    )
    group.add_argument(
        "--deepscale_config", default=None, type=str, help="deprecated form of --deepspeed_config"
    )
    return parser


def config_path_from_args(args: Any) -> str | None:
    """The config file the flags name, or None. Several flags naming different files is an
    error (which one was meant cannot be guessed)."""
    named: dict[str, str] = {}
    for attribute, flag in CONFIG_PATH_FLAGS:
        value = getattr(args, attribute, None)
        if isinstance(value, str) and value:
            named[flag] = value
    if len(set(named.values())) > 1:
        listed = ", ".join(f"{flag} {path}" for flag, path in named.items())
        raise ConfigError(
            "", f"the command line names several config files ({listed}); give only one"
        )
    return next(iter(named.values()), None)
