"""Fault injection for the crash-safety tests.

``OPENLLM_FAULT=point:N[:SIGNAL][,point:N...]`` kills this process with SIGKILL (or the signal named, e.g.
``TERM``) the N-th time it reaches ``point``: ``save`` (half-way through writing a checkpoint), ``eval``
(inside a validation pass), ``step`` (after the backward pass, before the optimizer step) or ``encode``
(``prepare``, after a chunk of encoded tokens is written, its workers busy with the next ones). Unset, it
costs one dict lookup. Under torchrun, ``OPENLLM_FAULT_RANK=R`` limits the faults to rank R, and they strike in
the first attempt only, not in the processes an elastic restart (``--max-restarts``) starts again.
"""

from __future__ import annotations

import os
import signal

_plan: dict[str, tuple[int, signal.Signals]] = {}
_here = os.environ.get("OPENLLM_FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
_first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
for item in filter(None, os.environ.get("OPENLLM_FAULT", "").split(",") if _here and _first_attempt else []):
    point, _, rest = item.partition(":")
    n, _, name = rest.partition(":")
    _plan[point.strip()] = (int(n or 1), signal.Signals["SIG" + name.strip().upper()] if name else signal.SIGKILL)
_seen: dict[str, int] = {}


def reached(point: str) -> None:
    if point not in _plan:
        return
    _seen[point] = _seen.get(point, 0) + 1
    n, sig = _plan[point]
    if _seen[point] == n:
        os.kill(os.getpid(), sig)
