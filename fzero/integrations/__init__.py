"""Thin shells over ``fzero/train.py`` for people coming from DeepSpeed: the ``fzero``
launcher, DeepSpeed's command-line config flags, and Hugging Face's "auto" config values."""

from __future__ import annotations

from fzero.integrations.arguments import add_config_arguments, config_path_from_args

__all__ = ["add_config_arguments", "config_path_from_args"]
