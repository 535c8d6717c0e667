"""The DeepSpeed key table: every DeepSpeed key fzero reads but does not implement.

Every DeepSpeed key is one of three things in fzero (``docs/config.md`` lists them all):

- implemented: a field of a ``Config`` block, with DeepSpeed's meaning;
- warned: accepted, with a one-time ``ConfigWarning`` that says why it has no effect here;
- rejected: a ``ConfigError``, unless the value asks for nothing (``false``, ``null``, a block
  with ``"enabled": false``, or the one value fzero always behaves as), which is accepted silently.

``RULES``, keyed by the JSON path of the key, joins the tables of the warned and rejected keys,
one file per DeepSpeed block (``keys_top_level.py``, ``keys_zero.py``, ``keys_optimizer.py``;
the ``Rule`` record is ``rules.py``). ``ALIASES`` maps DeepSpeed's alternative spellings (the
pydantic field names behind ``stage3_*`` aliases) to the name fzero stores. ``apply_rule`` is
what the parser calls for a key that is no field.
"""

from __future__ import annotations

from typing import Any

from fzero.config.keys_optimizer import OPTIMIZER_RULES
from fzero.config.keys_top_level import TOP_LEVEL_RULES
from fzero.config.keys_zero import ZERO_RULES
from fzero.config.notes import note, suggest, warn_no_effect
from fzero.config.rules import Rule
from fzero.errors import ConfigError, ConfigTypeError

RULES: dict[str, Rule] = {**TOP_LEVEL_RULES, **ZERO_RULES, **OPTIMIZER_RULES}

ALIASES: dict[str, str] = {
    "seq_parallel_comm_data_type": "seq_parallel_communication_data_type",  # the old name
    "zero_optimization.prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "zero_optimization.param_persistence_threshold": "stage3_param_persistence_threshold",
    "zero_optimization.max_live_parameters": "stage3_max_live_parameters",
    "zero_optimization.max_reuse_distance": "stage3_max_reuse_distance",
    "zero_optimization.model_persistence_threshold": "stage3_model_persistence_threshold",
    "zero_optimization.gather_16bit_weights_on_model_save": (
        "stage3_gather_16bit_weights_on_model_save"
    ),
    "zero_optimization.module_granularity_threshold": "stage3_module_granularity_threshold",
    "zero_optimization.use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
    "zero_optimization.allgather_sequential": "stage3_allgather_sequential",
}


def apply_rule(path: str, value: Any) -> bool:
    """Accept quietly, warn about or reject the unimplemented key at ``path``; False if no rule
    names it. ``"auto"`` in a warned key is quiet: DeepSpeed drops it and uses its default."""
    rule = RULES.get(path)
    if rule is None:
        return False
    if rule.keys:
        if not isinstance(value, dict):
            raise ConfigTypeError(path, f"expected an object, got {value!r}")
        for key in value:
            if key not in rule.keys:
                raise ConfigError(f"{path}.{key}", f"unknown key{suggest(key, rule.keys)}")
    if rule.silent(value) or (rule.warned and value == "auto"):
        note("accepted", path)
        return True
    if rule.rejected:
        raise ConfigError(path, f"unsupported: {rule.reason} (got {value!r})")
    warn_no_effect(path, rule.reason)
    return True


def known_keys(path: str) -> list[str]:
    """The warned, rejected and alias keys directly under ``path`` (for suggestions)."""
    prefix = f"{path}." if path else ""
    names = [key[len(prefix) :] for key in (*RULES, *ALIASES) if key.startswith(prefix)]
    return [name for name in names if "." not in name]
