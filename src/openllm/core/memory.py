"""Free memory, for the checks that refuse an option value before allocating what it would take.

Values that size memory (a batch, a key/value cache, a tokenizer sample) are compared with what is
free now, so that ``--max-batch 100000000`` is one error at the start instead of an attempt to allocate
terabytes (or an out-of-memory kill later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# cgroup v2 and v1 files: (limit, usage) of the memory of this process's container, where there is one
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def available_memory(device: Any = None) -> int | None:
    """Bytes that can still be allocated on ``device`` (a torch.device; None or the CPU: the machine's
    available memory, within its container's limit where that is lower); None when it cannot be told."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    free = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(free) if free else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**62:  # ("max", or v1's huge "no limit")
            return max(0, int(limit) - int(usage))
        return None
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
