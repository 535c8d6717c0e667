"""Thin shells over ``fzero/train.py`` for people coming from DeepSpeed: the ``fzero`` launcher
(``launcher.py``), DeepSpeed's command-line config flags (``arguments.py``), ``fzero.initialize``
and its engine (``initialize.py``, ``engine.py``), and the Hugging Face Trainer
(``transformers.py``, with "auto" filling in ``hf_config.py``). See docs/deepspeed.md."""

from __future__ import annotations

from fzero.integrations.arguments import add_config_arguments, config_path_from_args

__all__ = ["add_config_arguments", "config_path_from_args"]
