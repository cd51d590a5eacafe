"""Progress of long operations (eval, prepare, convert, export): a tqdm bar on a terminal, otherwise one
line on stderr every ``OPENLLM_PROGRESS_SECONDS`` seconds (default 10) and one at the end."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class Progress:
    def __init__(self, total: int, what: str, unit: str = "it"):
        self.total, self.what, self.unit = total, what, unit
        self.done = 0
        self.started = self.last = time.monotonic()
        self.every = float(os.environ.get("OPENLLM_PROGRESS_SECONDS", "10"))
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%, "
            f"{rate:,.1f} {self.unit}/s, eta {eta:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif time.monotonic() - self.started >= self.every:  # long enough to have been reported: say it ended
            self._line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
