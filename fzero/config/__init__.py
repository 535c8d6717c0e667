"""Configuration: fzero's knobs under DeepSpeed's names.

`parse` reads dicts and JSON/HJSON files; `keys` is the DeepSpeed key table (its rules by block
in `keys_top_level`, `keys_zero`, `keys_optimizer`; the rule record in `rules`); `zero_block`,
`optimizer_block`, `precision_blocks` and `runtime_blocks` are the typed blocks (`ranges` their
range checks); `validate` checks across blocks; `resolve` fills "auto"; `lr_schedules` holds the
learning-rate schedules; `config` the `Config` that holds them all.
"""

from __future__ import annotations

from fzero.config.config import Config, names_stage

__all__ = ["Config", "names_stage"]
