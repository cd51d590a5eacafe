"""Writing a run's checkpoints: ``best_model.pt`` and ``final_model.pt`` (one file, gathered whole under
--fsdp), the step checkpoints (one file, or under --fsdp a directory of every process's shards) and the
rotation of old ones.

With ``--async-save`` a step checkpoint is written by a thread while training goes on. What it writes is
copied first (the whole checkpoint for one file, each process's shards for a directory: DCP's asynchronous
save), so later steps cannot reach it, and it is written as crash-safely as in the foreground: under a
temporary name, renamed once complete. A kill during a background write leaves the previous checkpoint the
newest complete one. One save is in flight at a time: the next one, a rollback and the end of the run wait
for it, and a failure of it stops the run there with its message.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core.errors import OpenLLMError
from openllm.training import records
from openllm.training.distributed import barrier
from openllm.training.run import Run
from openllm.training.sharding import is_sharded


class BackgroundSave:
    """A step checkpoint a thread is writing."""

    def __init__(self, path: Path, work: Callable[[], None]):
        self.path, self.error = path, cast(BaseException | None, None)
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"writing {path.name}", daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if isinstance(self.error, OpenLLMError):
            raise self.error
        if self.error is not None:
            raise OpenLLMError(f"could not write {self.path} in the background: {self.error}") from self.error


def wait_for_saves(run: Run) -> None:
    """Wait for the step checkpoint being written in the background, if any (its failure is raised here)."""
    pending, run.pending_save = run.pending_save, None
    if pending is not None:
        pending.wait()


def abandon_saves(run: Run) -> None:
    """Let the background save finish while the run ends on another error: its own failure is only said."""
    try:
        wait_for_saves(run)
    except OpenLLMError as exc:
        run.log(f"warning: {exc}")


def save(run: Run, name: str) -> Path:
    """Write ``best_model.pt`` or ``final_model.pt``: one file, which every tool reads (under --fsdp every
    process takes part in gathering the tensors whole; rank 0 writes them)."""
    path = run.run_dir / name
    sharded = is_sharded(run.raw_model)
    ckpt = records.build_checkpoint(run, whole=True) if sharded or run.dist.is_main else None
    if ckpt is not None and run.dist.is_main:
        ck.save_checkpoint(ckpt, path)
        records.write_logs(run)
    barrier(run.dist)
    return path


def save_step_checkpoint(run: Run) -> Path:
    """Write the checkpoint of the step just taken (in the background with --async-save), then keep only the
    newest ``--keep-last`` (never the best one's nor the one resumed from)."""
    wait_for_saves(run)
    st, sharded = run.state, is_sharded(run.raw_model)
    path = run.run_dir / rundir.step_file(st.step, sharded)
    best = [run.run_dir / rundir.step_file(st.best_step, s) for s in (False, True)] if st.best_step else []
    protect = [run.resumed_path, run.last_checkpoint, *best, path]  # (the last: a rollback's target)

    def rotate() -> None:
        if run.dist.is_main:
            rundir.rotate(run.run_dir, run.cfg.keep_last, protect=protect)

    def then_rotate(write: Callable[[], object]) -> Callable[[], None]:
        def work() -> None:
            write()
            rotate()

        return work

    if sharded:
        group = run.checkpoint_group if run.cfg.async_save else None
        finish = ck.save_sharded_checkpoint(records.build_checkpoint(run), path, group, background=run.cfg.async_save)
        if finish is not None:
            run.pending_save = BackgroundSave(path, then_rotate(finish))
        else:
            rotate()
    elif run.dist.is_main and run.cfg.async_save:
        snapshot = host_copy(records.build_checkpoint(run))  # (copied: later steps change the originals)
        run.pending_save = BackgroundSave(path, then_rotate(lambda: ck.save_checkpoint(snapshot, path)))
    elif run.dist.is_main:
        ck.save_checkpoint(records.build_checkpoint(run), path)
        rotate()
    if run.dist.is_main:
        records.write_logs(run)
    barrier(run.dist)
    if st.consecutive_bad == 0:  # the rollback target: written while the loss was healthy
        run.last_checkpoint = path
    return path


def host_copy(obj: Any, memo: dict | None = None) -> Any:
    """``obj`` with every tensor copied to the CPU (once per storage view: tied weights stay tied) and every
    container copied, so that nothing training changes later reaches it."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: host_copy(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, memo) for v in obj)
    return copy.deepcopy(obj)
