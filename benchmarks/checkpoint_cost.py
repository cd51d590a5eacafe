#!/usr/bin/env python3
"""Training time lost per step checkpoint, written in the foreground and with ``--async-save``.

    python benchmarks/checkpoint_cost.py                      # the `medium` shape on this CPU (about 10 minutes)
    python benchmarks/checkpoint_cost.py --model-size tiny --steps 6 --every 2 --repeats 1   # a quick look

Three runs of the same steps, interleaved and repeated: without step checkpoints, with one every ``--every``
steps written by the training loop, and the same written in the background. The time lost per checkpoint is
the run's extra training time (its steps, and the loop's time in saving or waiting for a save) over the run
without them, divided by the checkpoints it wrote; the ratio async / sync is the figure to compare across
machines (these machines are shared and absolute times drift). Under
torchrun (``--fsdp``) the checkpoints are directories every process writes its shards into.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def time_lost_per_checkpoint(
    run: Callable[[str, dict], Path], steps: int, every: int, repeats: int
) -> tuple[float, float, int]:
    """(seconds of training lost per checkpoint written in the foreground, in the background, checkpoints per
    run). ``run(out, changes)`` trains ``steps`` steps with the options ``changes`` and returns its run directory.

    A run's training time is the sum of its steps' times (``metrics.jsonl``) and of the time the loop spends in
    writing step checkpoints or waiting for one written in the background: so the end of the run (the final
    model and its report, the same in every variant) does not blur the difference, and a background write that
    slows the steps beside it counts."""
    saves = len(range(every, steps, every))  # (none at the last step: the final model is saved either way)
    if saves == 0:
        raise SystemExit(f"--every {every} writes no step checkpoint in {steps} steps")
    variants = {
        "none": {"save_every": 10**6},
        "sync": {"save_every": every},
        "async": {"save_every": every, "async_save": True},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    run("warm-up", {**variants["none"], "max_steps": 2})  # (the first run in a process pays for imports and caches)
    for i in range(repeats):
        for name, changes in variants.items():
            with blocked_time() as blocked:
                out = run(f"{name}-{i}", {"keep_last": 1, **changes})
                steps_s = sum(json.loads(x)["step_time"] for x in (out / "metrics.jsonl").read_text().splitlines())
            times[name].append(steps_s + blocked[0])
            shutil.rmtree(out, ignore_errors=True)
    none = statistics.median(times["none"])
    return (
        (statistics.median(times["sync"]) - none) / saves,
        (statistics.median(times["async"]) - none) / saves,
        saves,
    )


@contextlib.contextmanager
def blocked_time() -> Iterator[list[float]]:
    """The seconds the training loop spends in writing step checkpoints and in waiting for background ones."""
    from openllm.training import loop

    total = [0.0]
    originals = {name: getattr(loop, name) for name in ("save_step_checkpoint", "wait_for_saves")}

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t0

        return call

    for name, fn in originals.items():
        setattr(loop, name, timed(fn))
    try:
        yield total
    finally:
        for name, fn in originals.items():
            setattr(loop, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="medium")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model and write sharded checkpoints")
    a = p.parse_args()

    from openllm.core.environment import describe_environment
    from openllm.data.prepare import prepare_dataset
    from openllm.training.config import TrainConfig
    from openllm.training.loop import train

    work = Path(tempfile.mkdtemp(prefix="openllm-checkpoint-cost-"))
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        data = work / "data"
        if main_process:
            prepare_dataset([CORPUS], data, vocab_size=2000, workers=1)
        else:
            while not (data / "meta.json").is_file():
                time.sleep(0.5)

        def run(out: str, changes: dict) -> Path:
            cfg = TrainConfig(
                data=str(data), output_dir=str(work / out), model_size=a.model_size,
                batch_size=a.batch_size, seq_len=a.seq_len, eval_every=10**6, eval_batches=1, warmup_steps=1,
                sample_tokens=0, log_every=10**6, fsdp=a.fsdp, **{"max_steps": a.steps, **changes},
            )  # fmt: skip
            train(cfg, log=lambda _m: None)
            return work / out

        sync, background, saves = time_lost_per_checkpoint(run, a.steps, a.every, a.repeats)
        if main_process:
            print(describe_environment().get("cpu", ""))
            print(
                f"{a.model_size}, {a.steps} steps, a checkpoint every {a.every} ({saves} a run), {a.repeats} repeats"
                f"{', --fsdp' if a.fsdp else ''}"
            )
            print("| checkpoint written | training time lost per checkpoint |")
            print("| --- | --- |")
            print(f"| in the foreground | {sync:.2f} s |")
            print(f"| in the background (--async-save) | {background:.2f} s |")
            print(f"| ratio background / foreground | {background / sync:.2f} |" if sync > 0 else "| ratio | n/a |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
