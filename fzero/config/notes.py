"""What one parse of a config accepted quietly, said once when the parse ends.

A config is read by recursive ``build`` calls; the keys they accept without effect, the "auto"
values that take DeepSpeed's default and the unknown top-level keys they ignore are collected
here (a context variable, so nested and concurrent parses each keep their own) and reported by
``report``: one ``ConfigWarning`` for the ignored keys, one INFO line for each of the others.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from fzero.errors import ConfigWarning

logger = logging.getLogger("fzero")


@dataclass
class ParseNotes:
    """What one ``Config.from_dict`` accepted quietly, for its INFO lines: keys accepted without
    effect (``accepted``), ``"auto"`` values replaced by DeepSpeed's default (``defaults``), and
    unknown top-level keys (``ignored``, warned once)."""

    accepted: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


_NOTES: ContextVar[ParseNotes | None] = ContextVar("fzero_parse_notes", default=None)


@contextmanager
def collecting_notes() -> Iterator[ParseNotes]:
    """Collect the notes of the parse that runs inside the ``with`` block."""
    notes = ParseNotes()
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def note(kind: str, text: str) -> None:
    """Add ``text`` to the current parse's notes of ``kind`` (nothing outside a parse)."""
    notes = _NOTES.get()
    if notes is not None:
        getattr(notes, kind).append(text)


def report(notes: ParseNotes) -> None:
    """Say once what a parse accepted quietly: unknown top-level keys (a ``ConfigWarning``: a
    typo there would otherwise go unnoticed), and at INFO the keys accepted without effect and
    the "auto" values that took DeepSpeed's default."""
    if notes.ignored:
        warnings.warn(
            f"ignored top-level keys that fzero does not know: {', '.join(notes.ignored)} "
            "(DeepSpeed ignores the top-level keys it does not read; remove them to silence this)",
            ConfigWarning,
            stacklevel=4,
        )
    if notes.accepted:
        logger.info(
            "accepted without effect (fzero does this anyway, or it is switched off): %s",
            ", ".join(notes.accepted),
        )
    if notes.defaults:
        logger.info('"auto" took DeepSpeed\'s default: %s', ", ".join(notes.defaults))


def warn_no_effect(path: str, reason: str) -> None:
    """One ``ConfigWarning`` per distinct message (Python's default warning filter)."""
    warnings.warn(
        f"{path}: accepted but has no effect in fzero: {reason}", ConfigWarning, stacklevel=2
    )


def suggest(key: str, candidates: Any, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    guess = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=cutoff)
    return f"; did you mean {guess[0]!r}?" if guess else ""
