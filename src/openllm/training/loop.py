"""The training loop: accumulation, clipping, validation, best-model tracking, early stopping, exact resume.

``train(TrainConfig(...))`` is the whole job; :func:`train_loop` is the loop itself and everything
it calls is a small function below it. The run is built by :mod:`openllm.training.setup`; the
checkpoint format lives in :mod:`openllm.checkpoint.format`, the records a run writes in
:mod:`openllm.training.records`, the schedule in :mod:`openllm.training.schedule`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core import faults
from openllm.core.fileio import directory_lock, remove_stale_temporaries
from openllm.core.numbers import perplexity
from openllm.data.mixture import MixtureEvalBatches
from openllm.training import records
from openllm.training.chatdata import IGNORE, inputs_targets
from openllm.training.checkpointing import abandon_saves, save, save_step_checkpoint, wait_for_saves
from openllm.training.config import RunConfig, TrainConfig
from openllm.training.distributed import (
    DistInfo,
    barrier,
    broadcast_flag,
    broadcast_value,
    failed_collective,
    lost_processes,
    mean_across,
    shutdown,
)
from openllm.training.metrics import MetricsLog, memory_mb
from openllm.training.optim import step_unless
from openllm.training.resume import restore
from openllm.training.run import Run, StartingPoint, TrainingStopped, TrainResult
from openllm.training.schedule import lr_at
from openllm.training.setup import check_before_writing, setup
from openllm.training.sharding import full_value, gradient_sync

__all__ = ["TrainingStopped", "lr_at", "train", "train_loop", "train_step"]


# ------------------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig | RunConfig,
    log: Callable[[str], None] = print,
    start: Callable[[str], StartingPoint] | None = None,
) -> TrainResult | None:
    """Run (or resume) a training job described by ``cfg`` (see ``openllm train --help``); None when a
    resumed run has nothing left to do. The run directory is locked for the whole job (rank 0 only).
    ``start`` loads a new fine-tune's base model (:func:`openllm.finetune.finetune` gives it)."""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and cfg.resume != "auto" and (not cfg.resume or rundir.resume_candidates(cfg.run_dir())):
        # torchrun started the processes again after one failed (--max-restarts): go on from the newest checkpoint
        # of the run (a --resume PATH given is where the run began, unless it has written none yet)
        if os.environ.get("RANK", "0") == "0":
            log(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming with --resume auto")
        cfg = dataclasses.replace(cfg, resume="auto")
    check_before_writing(cfg)
    run_dir = cfg.run_dir()
    is_main = os.environ.get("RANK", "0") == "0"
    lock = directory_lock(run_dir, "run directory") if is_main else contextlib.nullcontext()
    console = ConsoleLog(log)
    with lock, console:
        if is_main:
            remove_stale_temporaries(run_dir)
        run = None
        try:
            run = setup(cfg, console, start)
            if run is not None and is_main:
                console.keep_in(run.run_dir / "train.log")
            return train_loop(run) if run is not None else None
        except TrainingStopped as exc:
            console.keep(f"stopped: {exc}")
            raise
        except (torch.distributed.DistError, RuntimeError) as exc:
            processes = run.dist if run else DistInfo.from_environment()
            if not failed_collective(exc, processes):
                raise
            raise lost_processes(exc, processes) from None  # a process died or hangs: one line, naming it
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


# The host reads the figures of unlogged steps at least this often, to bound the device memory they hold.
READ_AT_LEAST_EVERY = 1000


def train_loop(run: Run) -> TrainResult:
    """The steps, validations and checkpoints of the run.

    The host never waits for the device between reads: a step's loss, gradient norm and non-finite flag stay
    on the device (a non-finite step is skipped there, see optim.step_unless) until :func:`read_steps` takes
    the figures of all unread steps at once. That happens after every step that logs (``--log-every``, the
    last step), validates or saves, when a stop is requested, and at least every READ_AT_LEAST_EVERY steps;
    only then are skipped steps reported, counted, and a run of ``--max-bad-steps`` of them rolled back, so
    the stop comes at the latest at that next read, with the same message and files as at the step itself.
    """
    cfg, st = run.cfg, run.state
    metrics = MetricsLog(
        run.run_dir / "metrics.jsonl",
        cfg.max_steps,
        st.step,
        run.dist.is_main,
        cfg.log_every,
        keep=getattr(run.log, "keep", None),
    )
    signals = StopSignals()
    started = time.perf_counter() - st.elapsed_seconds
    unread: list[StepOnDevice] = []
    try:
        metrics.trackers = records.open_trackers(run, metrics.say, metrics.dropped)
        while st.step < cfg.max_steps and not st.stopped:
            unread.append(train_step(run))
            st.elapsed_seconds = time.perf_counter() - started
            # every rank reads at the same steps; with torchrun a stop request is shared only then
            stop = signals.received is not None and not run.dist.enabled
            if stop or read_due(run, len(unread)):
                read_steps(run, unread, metrics)
                stop = stop or broadcast_flag(run.dist, signals.received is not None)
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps:
                validate(run, metrics.say)
                metrics.validation(st.step, st.validation_log[-1])
            if st.step % cfg.save_every == 0 and not st.stopped and st.step < cfg.max_steps:
                save_step_checkpoint(run)
            if stop:
                st.stop_reason = f"stopped by {signals.received} at step {st.step} (resumable with --resume auto)"
                path = save_step_checkpoint(run)
                wait_for_saves(run)  # (said saved only once it is)
                if run.dist.is_main:
                    records.write_model_card(run)
                raise TrainingStopped(
                    f"stopped by {signals.received} at step {st.step}; saved {path}. Resume with: "
                    f"openllm train --output-dir {run.run_dir} --resume auto",
                    130,
                )
        return finish(run, metrics)
    except BaseException:
        abandon_saves(run)  # (a background save still completes; its own failure does not hide this one)
        raise
    finally:
        metrics.close()
        signals.restore()


def read_due(run: Run, unread: int) -> bool:
    """Whether the step just taken must be read now: it logs, validates, saves or ends the run."""
    cfg, step = run.cfg, run.state.step
    return (
        step % cfg.log_every == 0
        or step % cfg.eval_every == 0
        or step % cfg.save_every == 0
        or step >= cfg.max_steps
        or unread >= READ_AT_LEAST_EVERY
    )


@dataclass
class StepOnDevice:
    """A step taken: what the host knows of it, and its figures still on the device."""

    step: int
    figures: torch.Tensor  # [loss, gradient norm, 1.0 if not finite]
    learning_rate: float
    step_time: float
    tokens: int


def train_step(run: Run) -> StepOnDevice:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, queued without waiting for the
    device; :func:`read_steps` makes its log record."""
    cfg, st, B = run.cfg, run.state, run.cfg.batch_size
    accum, world, rank = cfg.gradient_accumulation_steps, run.dist.world_size, run.dist.rank
    step = st.step + 1
    lr = lr_at(step, cfg.schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    # every counted target of the global batch weighs the same, whichever micro-batch and process it is in: a
    # micro-batch's mean loss counts by its share of the batch's targets (known on the host, no sync needed)
    total = run.sampler.counted_targets(st.samples_seen, run.global_batch)
    for micro in range(accum):
        x, y, counted = micro_batch(run, st.samples_seen + (micro * world + rank) * B)
        with gradient_sync(run.model, micro == accum - 1), run.autocast():  # (reduced after the last micro-batch)
            _, loss = run.model(x, y)
        # (text windows count every target: the share is 1/accum, divided exactly as it always was)
        loss = loss / accum if counted * world * accum == total else loss * (counted * world / total)
        run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        # while the device computes, the host cuts the next micro-batch (after the last: the next step's first)
        fetch_ahead(run, st.samples_seen + ((micro + 1) * world + rank) * B)
    faults.reached("step")
    run.scaler.unscale_(run.optimizer)  # type: ignore[arg-type]  # MuonAdamW has the param_groups it reads
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or math.inf))
    loss_mean = mean_across(run.dist, loss_sum)
    bad = ~torch.isfinite(loss_mean)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # type: ignore[arg-type]  # skips the update itself when gradients overflowed
        run.scaler.update()
    else:
        bad |= ~torch.isfinite(grad_norm)
        step_unless(run.optimizer, bad)
    run.optimizer.zero_grad(set_to_none=True)
    figures = torch.stack([loss_mean, grad_norm.to(loss_mean.dtype), bad.to(loss_mean.dtype)])
    st.step = step
    tokens = run.sampler.tokens_in(st.samples_seen, run.global_batch)  # (a conversation's real ones, no padding)
    st.samples_seen += run.global_batch
    st.tokens_seen += tokens
    return StepOnDevice(step, figures, lr, time.perf_counter() - t0, tokens)


def micro_batch(run: Run, first: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs and targets of the micro-batch of samples ``first``.. on the device (fetched ahead if it was), and
    how many of its targets the loss counts."""
    ahead, run.next_batch = run.next_batch, None
    if ahead is not None and ahead[0] == first:
        return ahead[1], ahead[2], ahead[3]
    return fetch(run, first)


def fetch_ahead(run: Run, first: int) -> None:
    run.next_batch = (first, *fetch(run, first))


def fetch(run: Run, first: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    counted = run.sampler.counted_targets(first, run.cfg.batch_size)
    block = run.sampler.windows(first, run.cfg.batch_size)
    if run.device.type == "cuda":  # from pinned memory the copy runs beside the computation
        block = block.pin_memory().to(run.device, non_blocking=True)
    return (*inputs_targets(block), counted)


def read_steps(run: Run, unread: list[StepOnDevice], metrics: MetricsLog) -> None:
    """Read the figures of the unread steps (one transfer, where the host waits for the device) and log them
    in order: metrics line, training log, counters, the skipped-step message; ``--max-bad-steps`` non-finite
    steps in a row roll back here. Empties ``unread``."""
    if not unread:
        return
    cfg, st = run.cfg, run.state
    t0 = time.perf_counter()
    values = torch.stack([s.figures for s in unread]).tolist()
    unread[-1].step_time += time.perf_counter() - t0  # the wait belongs to the steps the device was finishing
    memory = memory_mb(run.device)
    taken, unread[:] = list(unread), []
    for s, (loss, norm, flag) in zip(taken, values, strict=True):
        bad = flag != 0
        st.skipped_steps += bad
        st.consecutive_bad = st.consecutive_bad + 1 if bad else 0
        if not bad:
            st.lowest_training_loss = min(st.lowest_training_loss, loss)
        record = {
            "step": s.step,
            "loss": loss,
            "perplexity": perplexity(loss),
            "learning_rate": s.learning_rate,
            "step_time": s.step_time,
            "tokens_per_second": s.tokens / s.step_time,
            "memory_mb": memory,
            "grad_norm": norm,
            "skipped": bad,
        }
        if run.peak_flops:
            record["mfu"] = (
                run.raw_model.flops_per_token(cfg.seq_len)
                * s.tokens
                / s.step_time
                / run.peak_flops
                / run.dist.world_size
            )
        st.training_log.append(record)
        metrics.step(record)
        if bad:
            metrics.say(f"step {s.step}: loss {loss} / grad norm {norm} not finite; step skipped")
            if st.consecutive_bad >= cfg.max_bad_steps:
                roll_back(run, s.step)


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
        counted = int((y != IGNORE).sum())  # (a fine-tune's targets leave padding and prompts out)
        total += loss.double().cpu() * counted
        count += counted
    model.train(was_training)
    return float(total / max(count, 1))


def validate(run: Run, say: Callable[[str], None]) -> None:
    """Evaluate, log, keep ``best_model.pt`` and apply early stopping."""
    cfg, st = run.cfg, run.state
    t0, c0 = time.perf_counter(), time.process_time()
    # float32 on the CPU, so that `openllm eval` reproduces the logged figure exactly
    autocast = run.autocast if run.device.type == "cuda" else contextlib.nullcontext
    by_dataset = None
    if isinstance(run.val_batches, MixtureEvalBatches):  # each dataset's loss; the mixture's is their weighted mean
        by_dataset = {n: evaluate(run.raw_model, b, autocast) for n, b in run.val_batches.parts.items()}
        loss = run.val_batches.combine(by_dataset)
    else:
        loss = evaluate(run.raw_model, run.val_batches, autocast)
    loss = broadcast_value(run.dist, loss)  # (every process decides on rank 0's figure: best model, early stop)
    run.eval_seconds += time.perf_counter() - t0
    run.eval_cpu_seconds += time.process_time() - c0
    record = {"step": st.step, "validation_loss": loss, "validation_perplexity": perplexity(loss)}
    st.validation_log.append({**record, **({"validation_loss_by_dataset": by_dataset} if by_dataset else {})})
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
    parts = f" [{', '.join(f'{n} {v:.4f}' for n, v in by_dataset.items())}]" if by_dataset else ""
    say(
        f"step {st.step}: validation loss {loss:.4f} (ppl {perplexity(loss):.1f}){parts}"
        + (" - new best, saved best_model.pt" if improved else f", no improvement ({st.bad_evals})")
    )


def finish(run: Run, metrics: MetricsLog) -> TrainResult:
    st = run.state
    if st.stop_reason is None:
        st.stop_reason = f"reached --max-steps {run.cfg.max_steps}"
    wait_for_saves(run)
    path = save(run, rundir.FINAL)
    if run.dist.is_main:
        records.write_plot(run)
        info = records.write_model_card(run)  # the report, which shows the curves just drawn
        records.finish_trackers(run, metrics.trackers, info)
    return TrainResult(run.run_dir, st.step, st.best_step, st.best_validation_loss, st.stop_reason, path, run.cfg)


def roll_back(run: Run, last_bad: int) -> None:
    n = run.state.consecutive_bad
    first_bad = last_bad - n + 1
    wait_for_saves(run)
    barrier(run.dist)  # (rank 0 may have been the one writing it)
    target = run.last_checkpoint or run.resumed_path
    if target is None or not target.exists():
        raise TrainingStopped(
            f"the loss was not finite for {n} steps in a row (steps {first_bad}-{last_bad}) and no "
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
