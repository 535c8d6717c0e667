"""Recompute the compute-dtype parameters from the fp32 master, after the master was written
directly (as ``fzero.load`` does) rather than by an optimizer step."""

from __future__ import annotations

from fzero.state.buffers import is_allocated
from fzero.state.zero_state import ZeroState


def refresh_parameters(state: ZeroState) -> None:
    """Make every value the model computes with agree with ``state.master``.

    - Stage 0: the compute-dtype shard's trainable part becomes the master, cast (nothing when
      the shard is the master itself, fp32 with no frozen parameters).
    - Stages 1 and 2: the same for this rank's slice, then every unit is gathered, so the full
      buffers (which the model's parameters are views into) hold every rank's values.
    - Stage 3: nothing is kept between steps (gathers cast the master on the fly); a unit that is
      gathered right now is gathered again.

    Frozen values have no master: the caller writes them into ``state.param_shards``. A
    collective on every rank of the group: call it on all ranks together.
    """
    state.check_live()
    runtime = state.runtime
    executor, layout = runtime.executor, runtime.layout
    workspace = executor.workspace
    for unit in layout.units:
        out = workspace.param_out(unit.index)
        if out is not None:
            lo = unit.optimizer_offset
            out.copy_(state.master[lo : lo + unit.optimizer_numel])
        flat = workspace.param_flats[unit.index]
        if workspace.stage in (1, 2) or (workspace.stage == 3 and is_allocated(flat)):
            work, _source = executor.gather(unit.index)
            work.wait()
