"""The compiler's optimisation passes over an on-demand schedule, each keeping it correct:

- ``keep_for_reuse``: drop a release and the re-gather after it when the unit is used again
  soon (``stage3_max_reuse_distance``).
- ``prefetch``: move gathers to earlier compute triggers so they overlap compute
  (``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``).
- ``defer_reduce_waits``: let reductions run on under the next units' backward
  (``reduce_bucket_size`` with ``overlap_comm``).

They work on lists of ``Entry`` and unit sizes only, like the rest of ``fzero/schedule``.
"""

from __future__ import annotations

from dataclasses import replace

from fzero.schedule.ops import (
    BACKWARD_COMPUTE,
    BACKWARD_END,
    FORWARD_COMPUTE,
    PRE_BACKWARD,
    AllGather,
    Entry,
    Op,
    ReduceScatter,
    Release,
    WaitGather,
    WaitReduce,
)
from fzero.schedule.schedule import UnitInfo


def keep_for_reuse(
    units: tuple[UnitInfo, ...], entries: list[Entry], max_reuse_numel: int, max_live_nbytes: int
) -> list[Entry]:
    """Drop a release and the re-gather that follows it when the unit is used again within
    ``max_reuse_numel`` gathered elements (DeepSpeed's reuse distance: the parameters fetched in
    between, counted in the order-free schedule), as long as keeping it gathered in between
    stays under ``max_live_nbytes``. Typically the last blocks of forward, which backward needs
    first."""
    by_index = {u.index: u for u in units}
    original = list(entries)
    entries = list(entries)
    for i in range(len(entries)):
        for release in [op for op in entries[i].ops if isinstance(op, Release)]:
            unit = release.unit
            j = next(
                (
                    k
                    for k in range(i + 1, len(entries))
                    if any(isinstance(op, AllGather) and op.unit == unit for op in entries[k].ops)
                ),
                None,
            )
            if j is None:
                continue
            distance = sum(
                by_index[op.unit].numel
                for e in original[i + 1 : j]
                for op in e.ops
                if isinstance(op, AllGather)
            )
            if distance > max_reuse_numel:
                continue
            extra = by_index[unit].param_nbytes
            if any(
                _live_after(units, entries[: k + 1]) + extra > max_live_nbytes for k in range(i, j)
            ):
                continue
            entries[i] = replace(
                entries[i], ops=tuple(op for op in entries[i].ops if op != release)
            )
            entries[j] = replace(
                entries[j],
                ops=tuple(
                    op
                    for op in entries[j].ops
                    if not (isinstance(op, (AllGather, WaitGather)) and op.unit == unit)
                ),
            )
    return entries


def prefetch(
    units: tuple[UnitInfo, ...],
    entries: list[Entry],
    max_live_nbytes: int,
    bucket_numel: int = 0,
) -> list[Entry]:
    """Move each gather to an earlier compute trigger of the same pass, after that trigger's
    own wait, so it overlaps the compute in between: always one trigger earlier when the unit
    is not alive there, and further while the elements of the gathers in flight stay within
    ``bucket_numel`` (``stage3_prefetch_bucket_size``). Live bytes never exceed
    ``max_live_nbytes``.

    Nothing moves into the root unit's pre_backward: the root's backward (output head and
    loss) is where activation gradients peak, and a gather issued there would raise that peak
    by a whole block for little overlap."""
    by_index = {u.index: u for u in units}
    roots = {u.index for u in units if u.is_root}
    entries = list(entries)
    for i in range(1, len(entries)):
        for gather in [op for op in entries[i].ops if isinstance(op, AllGather)]:
            at = i
            while True:
                j = _previous_compute_entry(entries, at)
                if j is None or not _can_move(entries, gather.unit, j, at):
                    break
                if entries[j].trigger.kind == PRE_BACKWARD and entries[j].trigger.unit in roots:
                    break
                if any(
                    _live_after(units, entries[: k + 1]) + gather.nbytes > max_live_nbytes
                    for k in range(j, at)
                ):
                    break
                in_flight = _in_flight_numel(by_index, entries[: j + 1])
                if at != i and in_flight + by_index[gather.unit].numel > bucket_numel:
                    break
                entries[at] = replace(
                    entries[at], ops=tuple(op for op in entries[at].ops if op != gather)
                )
                entries[j] = replace(entries[j], ops=entries[j].ops + (gather,))
                at = j
    return entries


def defer_reduce_waits(
    units: tuple[UnitInfo, ...], entries: list[Entry], bucket_numel: int
) -> list[Entry]:
    """Let each reduce-scatter run on while the next units compute their backward: its wait
    moves to a later trigger, as soon as the elements of the reductions in flight would pass
    ``bucket_numel`` (the oldest is waited on first), and at the latest to the end of the
    backward pass. A unit's gradient buffer lives until its wait."""
    by_index = {u.index: u for u in units}
    pending: list[WaitReduce] = []
    out = []
    for entry in entries:
        ops: list[Op] = []
        for op in entry.ops:
            if isinstance(op, WaitReduce) and any(
                isinstance(o, ReduceScatter) and o.unit == op.unit for o in entry.ops
            ):
                pending.append(op)
                while sum(by_index[w.unit].numel for w in pending) > bucket_numel:
                    ops.append(pending.pop(0))
                continue
            ops.append(op)
        if entry.trigger.kind == BACKWARD_END:
            ops = [*pending, *ops]
            pending = []
        out.append(replace(entry, ops=tuple(ops)))
    return out


def _open_units(entries: list[Entry], opens: type, closes: type) -> set[int]:
    """Units with an ``opens`` op in ``entries`` that no later ``closes`` op of theirs ends:
    gathered and not released, or gathered and not yet waited on."""
    units: set[int] = set()
    for entry in entries:
        for op in entry.ops:
            if isinstance(op, opens):
                units.add(op.unit)
            elif isinstance(op, closes):
                units.discard(op.unit)
    return units


def _in_flight_numel(by_index: dict[int, UnitInfo], entries: list[Entry]) -> int:
    """Elements of the gathers issued in ``entries`` and not yet waited on there."""
    return sum(by_index[u].numel for u in _open_units(entries, AllGather, WaitGather))


def _previous_compute_entry(entries: list[Entry], i: int) -> int | None:
    """The compute trigger before entry ``i`` in the same pass (a recompute belongs to
    backward), or None at the start of the pass."""
    kind = entries[i].trigger.kind
    same_pass = FORWARD_COMPUTE if kind in FORWARD_COMPUTE else BACKWARD_COMPUTE
    for j in range(i - 1, -1, -1):
        if entries[j].trigger.kind in same_pass:
            return j
        if entries[j].trigger.kind in FORWARD_COMPUTE + BACKWARD_COMPUTE:
            return None  # do not cross from forward into backward
    return None


def _can_move(entries: list[Entry], unit: int, j: int, i: int) -> bool:
    """Whether ``unit``'s gather may move from entry ``i`` to the end of entry ``j``: the unit
    must not be alive after ``j`` (that would gather it twice) and nothing between may touch it
    (a release there would free the prefetched buffer)."""
    if unit in _open_units(entries[: j + 1], AllGather, Release):
        return False
    for entry in entries[j + 1 : i]:
        if entry.trigger.unit == unit or any(getattr(op, "unit", None) == unit for op in entry.ops):
            return False
    return True


def _live_after(units: tuple[UnitInfo, ...], entries: list[Entry]) -> int:
    """Gathered parameter bytes after ``entries`` (stage 3: persistent units always count)."""
    by_index = {u.index: u for u in units}
    live = {u.index for u in units if u.persistent} | _open_units(entries, AllGather, Release)
    return sum(by_index[i].param_nbytes for i in live)
