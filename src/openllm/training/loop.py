"""The training loop: accumulation, clipping, validation, best-model tracking, early stopping, exact resume.

``train(TrainConfig(...))`` is the whole job; :func:`train_loop` is the loop itself and everything
it calls is a small function below it. The run is built by :mod:`openllm.training.setup`; the
checkpoint format lives in :mod:`openllm.checkpoint.format`, the records a run writes in
:mod:`openllm.training.records`, the schedule in :mod:`openllm.training.schedule`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core import faults
from openllm.core.fileio import directory_lock, remove_stale_temporaries
from openllm.core.numbers import perplexity
from openllm.training import records
from openllm.training.config import DEFAULTS, TrainConfig
from openllm.training.distributed import DistInfo, barrier, broadcast_flag, mean_across, shutdown
from openllm.training.metrics import MetricsLog, memory_mb
from openllm.training.run import Run, TrainingStopped, TrainResult
from openllm.training.schedule import lr_at
from openllm.training.setup import check_before_writing, restore, setup

__all__ = ["TrainingStopped", "lr_at", "train", "train_loop", "train_step"]


# ------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult | None:
    """Run (or resume) a training job described by ``cfg`` (see ``openllm train --help``); None when a
    resumed run has nothing left to do. The run directory is locked for the whole job (rank 0 only)."""
    check_before_writing(cfg)
    run_dir = Path(cfg.given().get("output_dir") or DEFAULTS["output_dir"])
    is_main = os.environ.get("RANK", "0") == "0"
    lock = directory_lock(run_dir, "run directory") if is_main else contextlib.nullcontext()
    console = ConsoleLog(log)
    with lock, console:
        if is_main:
            remove_stale_temporaries(run_dir)
        run = setup(cfg, console)
        if run is not None and is_main:
            console.keep_in(run.run_dir / "train.log")
        try:
            return train_loop(run) if run is not None else None
        except TrainingStopped as exc:
            console.keep(f"stopped: {exc}")
            raise
        finally:
            shutdown(run.dist if run else DistInfo())


class ConsoleLog:
    """The run's console messages: shown through ``show`` and, once the run directory is known, also
    appended to ``train.log`` there (messages from before that are written first)."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show
        self.pending: list[str] = []
        self.file: TextIO | None = None

    def __call__(self, message: str) -> None:
        self.show(message)
        self.keep(message)

    def keep(self, message: str) -> None:
        """Record a message in train.log without showing it."""
        if self.file is None:
            self.pending.append(message)
        else:
            self.file.write(message + "\n")
            self.file.flush()

    def keep_in(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by __exit__
        self.file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} openllm train (pid {os.getpid()})\n")
        for message in self.pending:
            self.keep(message)
        self.pending.clear()

    def __enter__(self) -> ConsoleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def train_loop(run: Run) -> TrainResult:
    cfg, st = run.cfg, run.state
    metrics = MetricsLog(
        run.run_dir / "metrics.jsonl",
        cfg.max_steps,
        st.step,
        run.dist.is_main,
        cfg.log_every,
        cfg.tensorboard,
        keep=getattr(run.log, "keep", None),
    )
    signals = StopSignals()
    started = time.perf_counter() - st.elapsed_seconds
    try:
        while st.step < cfg.max_steps and not st.stopped:
            record = train_step(run)
            st.elapsed_seconds = time.perf_counter() - started
            metrics.step(record)
            if record["skipped"]:
                metrics.say(
                    f"step {st.step}: loss {record['loss']} / grad norm {record['grad_norm']} not finite; step skipped"
                )
                if st.consecutive_bad >= cfg.max_bad_steps:
                    roll_back(run)
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps:
                validate(run, metrics.say)
                metrics.validation(st.step, st.validation_log[-1]["validation_loss"])
            if st.step % cfg.save_every == 0 and not st.stopped and st.step < cfg.max_steps:
                save_step_checkpoint(run)
            if broadcast_flag(run.dist, signals.received is not None):
                st.stop_reason = f"stopped by {signals.received} at step {st.step} (resumable with --resume auto)"
                path = save_step_checkpoint(run)
                records.write_model_card(run)
                raise TrainingStopped(
                    f"stopped by {signals.received} at step {st.step}; saved {path}. Resume with: "
                    f"openllm train --output-dir {run.run_dir} --resume auto",
                    130,
                )
    finally:
        metrics.close()
        signals.restore()
    return finish(run)


def train_step(run: Run) -> dict:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its log record."""
    cfg, st, B = run.cfg, run.state, run.cfg.batch_size
    accum, world, rank = cfg.gradient_accumulation_steps, run.dist.world_size, run.dist.rank
    step = st.step + 1
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = run.sampler.batch(st.samples_seen + (micro * world + rank) * B, B)
        if run.device.type == "cuda":  # pinned host memory lets the copy overlap the previous micro-step
            x, y = x.pin_memory().to(run.device, non_blocking=True), y.pin_memory().to(run.device, non_blocking=True)
        no_sync = run.dist.enabled and micro < accum - 1
        with run.model.no_sync() if no_sync else contextlib.nullcontext(), run.autocast():
            _, loss = run.model(x, y)
        loss = loss / accum
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    faults.reached("step")
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or math.inf)
    loss_value = float(mean_across(run.dist, loss_sum).item())
    norm_value = float(grad_norm.item())
    bad = not math.isfinite(loss_value) or (not run.scaler.is_enabled() and not math.isfinite(norm_value))
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # skips the update itself when gradients overflowed
        run.scaler.update()
    elif not bad:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    step_time = time.perf_counter() - t0

    st.step = step
    st.samples_seen += run.global_batch
    tokens = run.global_batch * cfg.seq_len
    st.tokens_seen += tokens
    st.skipped_steps += bad
    st.consecutive_bad = st.consecutive_bad + 1 if bad else 0
    if not bad:
        st.lowest_training_loss = min(st.lowest_training_loss, loss_value)
    record = {
        "step": step,
        "loss": loss_value,
        "perplexity": perplexity(loss_value),
        "learning_rate": lr,
        "step_time": step_time,
        "tokens_per_second": tokens / step_time,
        "memory_mb": memory_mb(run.device),
        "grad_norm": norm_value,
        "skipped": bad,
    }
    if run.peak_flops:
        record["mfu"] = run.raw_model.flops_per_token(cfg.seq_len) * tokens / step_time / run.peak_flops / world
    st.training_log.append(record)
    return record


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Token-weighted mean cross-entropy over ``batches`` (the model's own mode is restored)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in batches:
        faults.reached("eval")
        with autocast():
            _, loss = model(x, y)
        total += loss.double().cpu() * y.numel()
        count += y.numel()
    model.train(was_training)
    return float(total / max(count, 1))


def validate(run: Run, say: Callable[[str], None]) -> None:
    """Evaluate, log, keep ``best_model.pt`` and apply early stopping."""
    cfg, st = run.cfg, run.state
    t0, c0 = time.perf_counter(), time.process_time()
    # float32 on the CPU, so that `openllm eval` reproduces the logged figure exactly
    loss = evaluate(
        run.raw_model, run.val_batches, run.autocast if run.device.type == "cuda" else contextlib.nullcontext
    )
    run.eval_seconds += time.perf_counter() - t0
    run.eval_cpu_seconds += time.process_time() - c0
    st.validation_log.append({"step": st.step, "validation_loss": loss, "validation_perplexity": perplexity(loss)})
    improved = loss < st.best_validation_loss - cfg.early_stopping_min_delta
    if improved:
        st.best_validation_loss, st.best_step, st.bad_evals = loss, st.step, 0
    else:
        st.bad_evals += 1
        if cfg.early_stopping_patience and st.bad_evals >= cfg.early_stopping_patience:
            st.stopped = True
            st.stop_reason = (
                f"early stopping at step {st.step}: validation loss did not improve by more than "
                f"{cfg.early_stopping_min_delta:g} for {st.bad_evals} evaluations "
                f"(best {st.best_validation_loss:.4f} at step {st.best_step})"
            )
    if improved:
        save(run, rundir.BEST)  # said only once it is on disk
    say(
        f"step {st.step}: validation loss {loss:.4f} (ppl {perplexity(loss):.1f})"
        + (" - new best, saved best_model.pt" if improved else f", no improvement ({st.bad_evals})")
    )


def save(run: Run, name: str) -> Path:
    path = run.run_dir / name
    if run.dist.is_main:
        ck.save_checkpoint(records.build_checkpoint(run), path)
        records.write_logs(run)
    barrier(run.dist)
    return path


def save_step_checkpoint(run: Run) -> Path:
    path = save(run, rundir.step_file(run.state.step))
    if run.state.consecutive_bad == 0:  # the rollback target: written while the loss was healthy
        run.last_checkpoint = path
    if run.dist.is_main:
        best = run.run_dir / rundir.step_file(run.state.best_step) if run.state.best_step else None
        rundir.rotate(run.run_dir, run.cfg.keep_last, protect=[run.resumed_path, best, path])
    return path


def finish(run: Run) -> TrainResult:
    st = run.state
    if st.stop_reason is None:
        st.stop_reason = f"reached --max-steps {run.cfg.max_steps}"
    path = save(run, rundir.FINAL)
    if run.dist.is_main:
        records.write_model_card(run)
        records.write_plot(run)
    return TrainResult(run.run_dir, st.step, st.best_step, st.best_validation_loss, st.stop_reason, path, run.cfg)


def roll_back(run: Run) -> None:
    st, n = run.state, run.state.consecutive_bad
    first_bad = st.step - n + 1
    target = run.last_checkpoint or run.resumed_path
    if target is None or not target.is_file():
        raise TrainingStopped(
            f"the loss was not finite for {n} steps in a row (steps {first_bad}-{st.step}) and no "
            "checkpoint had been written yet; nothing saved. Lower --learning-rate or check the data.",
            3,
        )
    restore(run, ck.load_checkpoint(target, run.device))
    if run.dist.is_main:
        records.write_logs(run)  # the logs now match the checkpoint to resume from; metrics.jsonl keeps the bad steps
    raise TrainingStopped(
        f"the loss was not finite for {n} steps in a row (steps {first_bad}-{first_bad + n - 1}); rolled back to "
        f"{target.name} (step {run.state.step}) and stopped. Lower --learning-rate or check the data, then "
        f"resume with --resume {target}",
        3,
    )


class StopSignals:
    """SIGINT/SIGTERM finish the current step, then the loop saves and exits; a second SIGINT aborts."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing step, saving a checkpoint...", flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
