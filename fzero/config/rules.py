"""What fzero does with a DeepSpeed key it reads but does not implement: the ``Rule`` record.

A rule warns (the key is accepted, with a one-time ``ConfigWarning`` giving its reason) or
rejects (a ``ConfigError``); either way a value that asks for nothing fzero lacks is accepted
silently. The predicates here say which values those are. The tables of rules, one file per
DeepSpeed block, are ``keys_top_level.py``, ``keys_zero.py`` and ``keys_optimizer.py``;
``keys.py`` joins them and applies them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def switched_off(value: Any) -> bool:
    """True for a value that switches a feature off: false, null, {}, or enabled: false."""
    if isinstance(value, dict):
        return not value or value.get("enabled") is False or value.get("enabled") == "auto"
    return value is None or value is False


def nothing_enabled(value: Any) -> bool:
    """True for a block in which no technique says ``"enabled": true``, at any depth: DeepSpeed's
    compression and data-efficiency blocks switch each technique on with its own
    ``enabled`` flag (``deepspeed/compression/config.py``, ``runtime/data_pipeline/config.py``)."""
    if isinstance(value, dict):
        return value.get("enabled") is not True and all(map(nothing_enabled, value.values()))
    return not isinstance(value, list) or all(map(nothing_enabled, value))


def never(value: Any) -> bool:
    return False


def always(value: Any) -> bool:
    return True


def equals(*expected: Any) -> Callable[[Any], bool]:
    """Accepts exactly the given values (``1 == True`` does not count)."""

    def accepts(value: Any) -> bool:
        return any(value == e and type(value) is type(e) for e in expected)

    return accepts


def all_false(value: Any) -> bool:
    """A block whose every switch is off (``activation_checkpointing`` with nothing enabled)."""
    return isinstance(value, dict) and not any(v is True for v in value.values())


@dataclass(frozen=True)
class Rule:
    """What fzero does with a DeepSpeed key it does not implement.

    ``silent`` says which values ask for nothing fzero lacks: what fzero does anyway, or a
    feature switched off. Those are accepted without a warning (and listed in one INFO line).
    Any other value is an error when ``rejected``, else accepted with a one-time
    ``ConfigWarning`` giving ``reason``. ``keys`` lists a warned block's sub-keys so that typos
    inside it are still caught.
    """

    reason: str
    silent: Callable[[Any], bool] = never
    rejected: bool = False
    keys: tuple[str, ...] = ()

    @property
    def warned(self) -> bool:
        return not self.rejected


def warned(reason: str, silent: Callable[[Any], bool] = never, keys: tuple[str, ...] = ()) -> Rule:
    return Rule(reason, silent, False, keys)


def rejected(reason: str, silent: Callable[[Any], bool] = switched_off) -> Rule:
    return Rule(reason, silent, True)


FALSE, TRUE = equals(False), equals(True)
# Shared by zero_optimization's keys that tune DeepSpeed's own offload code.
NO_OFFLOAD = (
    "it tunes DeepSpeed's offload code; fzero's offload copies each unit's gradient as its "
    "reduction lands and steps it on the host as the schedule says (docs/offload.md)"
)
