"""The training loop: AdamW, warmup + cosine schedule, accumulation, clipping, validation,
best-model tracking, early stopping and exact resume.

``train(TrainConfig(...))`` is the whole job; :func:`train_loop` is the loop itself and everything
it calls is a small function below it. The checkpoint format lives in :mod:`openllm.checkpoint`,
metrics in :mod:`openllm.metrics`, run-directory files in :mod:`openllm.rundir`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from openllm import checkpoint as ck
from openllm import faults, rundir
from openllm.config import ModelConfig, TrainConfig
from openllm.data import BatchSampler, PreparedDataset
from openllm.distributed import DistInfo, barrier, broadcast_flag, mean_across, shutdown
from openllm.errors import OpenLLMError
from openllm.metrics import MetricsLog, memory_mb, perplexity
from openllm.model import GPT


class TrainingStopped(OpenLLMError):
    """The run stopped before its planned end (a signal, or a diverged loss); the message says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry for exact resume."""

    step: int = 0
    samples_seen: int = 0
    best_validation_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    stop_reason: str | None = None
    skipped_steps: int = 0
    consecutive_bad: int = 0
    lowest_training_loss: float = math.inf
    elapsed_seconds: float = 0.0
    tokens_seen: int = 0
    resumed_from: list[str] = field(default_factory=list)
    training_log: list[dict] = field(default_factory=list)
    validation_log: list[dict] = field(default_factory=list)


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    dataset: PreparedDataset
    model_config: ModelConfig
    raw_model: GPT
    model: torch.nn.Module  # raw_model, possibly compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    device: torch.device
    autocast_dtype: torch.dtype
    dist: DistInfo
    state: RunState
    tokenizer_sha256: str
    resumed_path: Path | None = None
    last_checkpoint: Path | None = None
    log: Callable[[str], None] = print
    peak_flops: float | None = None
    eval_seconds: float = 0.0  # wall and CPU time spent in validation passes (benchmarks report them apart)
    eval_cpu_seconds: float = 0.0

    def autocast(self):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.dist.world_size


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_step: int | None
    best_validation_loss: float
    stop_reason: str | None
    final_checkpoint: Path | None


# ------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult | None:
    """Run (or resume) a training job described by ``cfg`` (see ``openllm train --help``); None when a
    resumed run has nothing left to do."""
    run = setup(cfg, log)
    try:
        return train_loop(run) if run is not None else None
    finally:
        shutdown(run.dist if run else DistInfo())


def train_loop(run: Run) -> TrainResult:
    cfg, st = run.cfg, run.state
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", cfg.max_steps, st.step, run.dist.is_main, cfg.log_every,
                         cfg.tensorboard)
    signals = StopSignals()
    started = time.perf_counter() - st.elapsed_seconds
    try:
        while st.step < cfg.max_steps and not st.stopped:
            record = train_step(run)
            st.elapsed_seconds = time.perf_counter() - started
            metrics.step(record)
            if record["skipped"]:
                metrics.say(f"step {st.step}: loss {record['loss']} / grad norm {record['grad_norm']} not finite; step skipped")
                if st.consecutive_bad >= cfg.max_bad_steps:
                    metrics.flush()
                    roll_back(run)
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps:
                validate(run, metrics.say)
                metrics.validation(st.step, st.validation_log[-1]["validation_loss"])
            if st.step % cfg.save_every == 0 and not st.stopped and st.step < cfg.max_steps:
                metrics.flush()
                save_step_checkpoint(run)
            if broadcast_flag(run.dist, signals.received is not None):
                metrics.flush()
                path = save_step_checkpoint(run)
                rundir.write_model_card(run)
                raise TrainingStopped(
                    f"stopped by {signals.received} at step {st.step}; saved {path}. Resume with: "
                    f"openllm train --output-dir {run.run_dir} --resume auto", 130)
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
        with (run.model.no_sync() if no_sync else contextlib.nullcontext()), run.autocast():
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
    record = {"step": step, "loss": loss_value, "perplexity": perplexity(loss_value), "learning_rate": lr,
              "step_time": step_time, "tokens_per_second": tokens / step_time,
              "memory_mb": memory_mb(run.device), "grad_norm": norm_value, "skipped": bad}
    if run.peak_flops:
        record["mfu"] = run.raw_model.flops_per_token(cfg.seq_len) * tokens / step_time / run.peak_flops / world
    st.training_log.append(record)
    return record


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr`` at ``lr_decay_steps``
    (default ``max_steps``); constant ``min_lr`` after that."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    horizon = cfg.lr_decay_steps or cfg.max_steps
    if step >= horizon:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, autocast=contextlib.nullcontext) -> float:
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
    loss = evaluate(run.raw_model, run.val_batches, run.autocast if run.device.type == "cuda" else contextlib.nullcontext)
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
            st.stop_reason = (f"early stopping at step {st.step}: validation loss did not improve by more than "
                              f"{cfg.early_stopping_min_delta:g} for {st.bad_evals} evaluations "
                              f"(best {st.best_validation_loss:.4f} at step {st.best_step})")
    say(f"step {st.step}: validation loss {loss:.4f} (ppl {perplexity(loss):.1f})"
        + (" - new best, saved best_model.pt" if improved else f", no improvement ({st.bad_evals})"))
    if improved:
        save(run, ck.BEST)


def save(run: Run, name: str) -> Path:
    path = run.run_dir / name
    if run.dist.is_main:
        ck.save_checkpoint(build_checkpoint(run), path)
        rundir.write_logs(run)
    barrier(run.dist)
    return path


def save_step_checkpoint(run: Run) -> Path:
    path = save(run, ck.step_file(run.state.step))
    if run.state.consecutive_bad == 0:  # the rollback target: written while the loss was healthy
        run.last_checkpoint = path
    if run.dist.is_main:
        best = run.run_dir / ck.step_file(run.state.best_step) if run.state.best_step else None
        ck.rotate(run.run_dir, run.cfg.keep_last, protect=[run.resumed_path, best, path])
    return path


def finish(run: Run) -> TrainResult:
    st = run.state
    if st.stop_reason is None:
        st.stop_reason = f"reached --max-steps {run.cfg.max_steps}"
    path = save(run, ck.FINAL)
    if run.dist.is_main:
        rundir.write_model_card(run)
        rundir.write_plot(run)
    return TrainResult(run.run_dir, st.step, st.best_step, st.best_validation_loss, st.stop_reason, path)


def roll_back(run: Run) -> None:
    st, n = run.state, run.state.consecutive_bad
    first_bad = st.step - n + 1
    target = run.last_checkpoint or run.resumed_path
    if target is None or not target.is_file():
        raise TrainingStopped(f"the loss was not finite for {n} steps in a row (steps {first_bad}-{st.step}) and no "
                              "checkpoint had been written yet; nothing saved. Lower --learning-rate or check the data.", 3)
    restore(run, ck.load_checkpoint(target, run.device))
    if run.dist.is_main:
        rundir.write_logs(run)  # the logs now match the checkpoint to resume from; metrics.jsonl keeps the bad steps
    raise TrainingStopped(
        f"the loss was not finite for {n} steps in a row (steps {first_bad}-{first_bad + n - 1}); rolled back to "
        f"{target.name} (step {run.state.step}) and stopped. Lower --learning-rate or check the data, then "
        f"resume with --resume {target}", 3)


# ---------------------------------------------------------------------------------- checkpoints

def build_checkpoint(run: Run) -> dict:
    st, cfg = run.state, run.cfg
    return {
        "model_state_dict": run.raw_model.state_dict(),
        "step": st.step,
        "epoch": st.samples_seen // run.sampler.windows_per_epoch,
        "best_loss": st.best_validation_loss,
        "best_validation_loss": st.best_validation_loss,
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": {"name": "warmup_cosine", "last_step": st.step, "last_lr": lr_at(max(st.step, 1), cfg),
                                 "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps,
                                 "decay_steps": cfg.lr_decay_steps or cfg.max_steps,
                                 "max_lr": cfg.learning_rate, "min_lr": cfg.min_lr},
        "training_log": st.training_log,
        "validation_log": st.validation_log,
        "config": run.model_config.to_dict(),
        "training_config": rundir.training_config(run),
        "model_info": rundir.model_info(run),
        "training_stats": rundir.training_stats(run),
        "resume_state": {
            "samples_seen": st.samples_seen,
            "global_token_offset": st.samples_seen * cfg.seq_len,
            "world_size": run.dist.world_size,
            "rng": ck.capture_rng_state(),
            "grad_scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "run_state": {k: v for k, v in asdict(st).items() if k not in ("training_log", "validation_log")},
        },
        "tokenizer_sha256": run.tokenizer_sha256,
        "dataset_fingerprint": run.dataset.fingerprint,
        "library_versions": ck.library_versions(),
        "provenance": {"source": "trained with openllm", "optimizer_state": "trained"},
    }


def restore(run: Run, ckpt: dict) -> None:
    """Load model, optimizer, scaler, RNG and progress from a checkpoint into ``run``."""
    run.raw_model.load_state_dict(ckpt["model_state_dict"])
    opt_state = ckpt.get("optimizer_state_dict") or {}
    if opt_state.get("state"):
        try:
            run.optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as exc:
            raise OpenLLMError(f"the checkpoint's optimizer state does not fit this model ({exc})") from None
    elif run.dist.is_main:
        run.log("note: the checkpoint has no optimizer state; starting with a fresh AdamW state")
    resume = ckpt.get("resume_state") or {}
    saved = resume.get("run_state", {})
    st = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    st.step = int(ckpt["step"])
    st.samples_seen = int(resume.get("samples_seen", st.step * run.global_batch))
    if not st.stopped:
        st.stop_reason = None  # "reached --max-steps" of the earlier invocation no longer holds
    st.training_log = list(ckpt.get("training_log") or [])
    st.validation_log = list(ckpt.get("validation_log") or [])
    if not saved:  # an imported checkpoint: best so far is what it reports
        bvl = ckpt.get("best_validation_loss")
        st.best_validation_loss = float(bvl) if isinstance(bvl, (int, float)) and bvl is not None else math.inf
    run.state = st
    if resume.get("grad_scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(resume["grad_scaler"])
    if "rng" in resume and resume.get("world_size", 1) == run.dist.world_size and not run.dist.enabled:
        ck.restore_rng_state(resume["rng"])


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


from openllm.launch import setup  # noqa: E402  (builds a Run; kept in its own module)

