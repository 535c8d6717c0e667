"""The machinery a sharded model keeps: the plan it runs (``plan.py``), the executor and its
op handlers (``executor.py``: gathers, gradient reduction, the step phase), the hooks that
raise the schedule's triggers, the cross-rank check and measured timelines. ``Runtime``
(``runtime.py``) holds them all; the progress of training is in the state, never here."""

from __future__ import annotations

from fzero.runtime.runtime import Runtime

__all__ = ["Runtime"]
