"""Flat buffers: the layout of parameters in them, and the training-state pytree."""

from __future__ import annotations

from fzero.state.layout import FlatLayout, ParamSlot, Unit, build_layout, find_unit_modules
from fzero.state.split import SplitFlat
from fzero.state.zero_state import NAMESPACE, ZeroState

__all__ = [
    "NAMESPACE",
    "FlatLayout",
    "ParamSlot",
    "SplitFlat",
    "Unit",
    "ZeroState",
    "build_layout",
    "find_unit_modules",
]
