"""Small numeric helpers shared by the records, the model card and the inspection tools."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(x: Any) -> float | int | None:
    """``x`` if it is a finite number, else None (for values that may be inf/NaN/missing in records)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x if math.isfinite(x) else None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
