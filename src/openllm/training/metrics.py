"""Per-step metrics: memory, MFU, the progress display and ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from openllm.core.fileio import atomic_write_text
from openllm.core.untrusted import BadDocument, parse_json
from openllm.training.trackers import Trackers, step_values, validation_values

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, for model FLOPs utilisation.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's resident set size on the CPU, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def peak_flops_for(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class MetricsLog:
    """Appends one JSON line per logged step to ``metrics.jsonl``; shows progress on a terminal."""

    def __init__(
        self,
        path: Path,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        log_every: int = 10,
        keep: Callable[[str], None] | None = None,
    ):
        self.enabled = enabled
        self.keep = keep or (lambda _message: None)  # also record messages (train.log) besides showing them
        self.trackers: Trackers | None = None  # --report-to (rank 0's): set by the loop once they are open
        self.dropped: dict[int, dict[str, float]] = {}  # steps after start_step an earlier attempt logged
        self.log_every = log_every
        self.path = path
        self.file = None
        self.bar = None
        self.started = time.time()
        self.start_step, self.total = start_step, total_steps
        if not enabled:
            return
        self.dropped = _truncate_after(path, start_step)
        self.file = open(path, "a", encoding="utf-8")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, record: dict) -> None:
        if self.file is None:  # not enabled (another process than rank 0 logs nothing)
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # every line reaches the OS at once: a kill after any later save loses no step
        step = record["step"]
        if self.trackers is not None:
            self.trackers.step(step, step_values(record))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(
                f"loss {record['loss']:.4f} ppl {record['perplexity']:.1f} lr {record['learning_rate']:.2e} "
                f"{record['tokens_per_second']:,.0f} tok/s",
                refresh=False,
            )
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.time() - self.started) / max(done, 1) * (self.total - step)
            line = (
                f"step {step}/{self.total} loss {record['loss']:.4f} ppl {record['perplexity']:.1f} "
                f"lr {record['learning_rate']:.2e} grad_norm {record['grad_norm']:.3f} "
                f"{record['tokens_per_second']:,.0f} tok/s mem {record['memory_mb']:.0f} MB eta {eta:.0f}s"
            )
            if self.bar is None:
                self.say(line)
            else:
                self.keep(line)  # the bar shows progress on the terminal; the log keeps the line

    def validation(self, step: int, record: dict) -> None:
        """A validation record (``validation_log``'s): the loss, and a mixture's loss on each dataset."""
        if self.trackers is not None:
            self.trackers.step(step, validation_values(record))

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)
        self.keep(message)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()
            self.file = None


def _truncate_after(path: Path, step: int) -> dict[int, dict[str, float]]:
    """Drop lines of steps after ``step`` (left by a run that died after its last checkpoint); returns their
    figures, as trackers were sent them."""
    if not path.is_file():
        return {}
    kept, dropped = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = parse_json(line)
        except BadDocument:
            continue  # a line torn by a crash
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        elif isinstance(record, dict) and isinstance(record.get("step"), int):
            dropped[record["step"]] = step_values(record)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
    return dropped
