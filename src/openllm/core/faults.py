"""Fault injection for the crash-safety tests.

``OPENLLM_FAULT=point:N[,point:N...]`` kills this process with SIGKILL the N-th time it reaches
``point``: ``save`` (half-way through writing a checkpoint), ``eval`` (inside a validation pass)
or ``step`` (after the backward pass, before the optimizer step). Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_plan: dict[str, int] = {}
for item in filter(None, os.environ.get("OPENLLM_FAULT", "").split(",")):
    point, _, n = item.partition(":")
    _plan[point.strip()] = int(n or 1)
_seen: dict[str, int] = {}


def reached(point: str) -> None:
    if point not in _plan:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == _plan[point]:
        os.kill(os.getpid(), signal.SIGKILL)
