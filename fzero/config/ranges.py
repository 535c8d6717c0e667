"""The range checks every config block uses in its ``validate``: each error names the key's path."""

from __future__ import annotations

from fzero.errors import ConfigError


def check_at_least(path: str, value: object, low: float) -> None:
    """Raise unless ``value`` is >= ``low``; None and "auto" pass (nothing to check yet)."""
    if isinstance(value, (int, float)) and not value >= low:
        raise ConfigError(path, f"must be >= {low}, got {value}")


def check_fraction(path: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(path, f"must be in [0, 1], got {value}")
