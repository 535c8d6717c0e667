"""Recompute the compute-dtype parameters from the fp32 master, after the master was written
directly (as ``fzero.load`` does) rather than by an optimizer step."""

from __future__ import annotations

from fzero.state.zero_state import ZeroState


def refresh_parameters(state: ZeroState) -> None:
    """Make every value the model computes with agree with ``state.master``
    (``Runtime.refresh_parameters``). Collective: call it on all ranks together."""
    state.check_live()
    state.runtime.refresh_parameters()
