"""Configuration: fzero's knobs under DeepSpeed's names.

`parse` reads dicts and JSON/HJSON files, `keys` is the DeepSpeed key table, `blocks` the typed
sub-blocks, `validate` the checks across blocks, `resolve` fills "auto", `lr_schedules` the
learning-rate schedules, `config` the `Config` that holds them all.
"""

from __future__ import annotations

from fzero.config.config import Config, names_stage

__all__ = ["Config", "names_stage"]
