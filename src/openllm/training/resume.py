"""The resume planner: what continuing a run means, decided in one place.

:func:`plan` finds the checkpoint to continue from (``--resume auto``, a run directory or a file), verifies
it, and resolves the options (given, then inherited from the checkpoint, then preset and defaults). The
:class:`ResumePlan` it returns then answers everything setting up the run asks of the checkpoint: whether
there is anything left to do, the model's shape, whether the tokenizer, the dataset and the model config
still fit, and, once the run is built, restores its state and reports what changed (validation text,
learning-rate schedule, CPU threads, number of processes). A new run gets a plan too, one that resumes
nothing, so :func:`openllm.training.setup.setup` reads the same either way.

The checkpoint itself is read through :class:`~openllm.checkpoint.format.CheckpointView` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import find_tokenizer
from openllm.model.config import ModelConfig, get_preset, model_config_for
from openllm.model.lora import has_lora, load_adapters
from openllm.training.config import RunConfig, ScheduleOptions, TrainConfig, resolve
from openllm.training.run import Run, StartingPoint
from openllm.training.schedule import describe_schedule, lr_at
from openllm.training.sharding import model_state_for, optimizer_state_for

Say = Callable[[str], None]


@dataclass(frozen=True)
class ResumePlan:
    """A run's relation to the checkpoint it continues (``path`` None: a new run)."""

    cfg: RunConfig  # resolved: given, then the checkpoint's training_config, then preset and defaults
    given: dict  # what the user gave (TrainConfig.given() before resolving)
    run_dir: Path
    path: Path | None = None
    checkpoint: ck.CheckpointView | None = field(default=None, repr=False)
    keep_shape: bool = False  # the resumed model keeps its own shape (no --model-size given)
    own_tokenizer: Path | None = None  # the tokenizer beside the checkpoint
    finished: str | None = None  # why a finished run has nothing left to do (None: train)
    start: StartingPoint | None = field(default=None, repr=False)  # a new fine-tune's base model

    @property
    def model_config(self) -> dict | None:
        """The resumed model's config, when it keeps its shape (or a new fine-tune's base model's); None when the
        preset decides it."""
        if self.start is not None and self.checkpoint is None:
            return self.start.model_config.to_dict()
        return self.checkpoint.model_config if self.checkpoint and self.keep_shape else None

    @property
    def context(self) -> int:
        """The context length of the model the run will train."""
        return (
            self.model_config["block_size"] if self.model_config else get_preset(self.cfg.model_size).model.block_size
        )

    def check_tokenizer(self, given: Path | None) -> None:
        """New text for a resumed model must be encoded with its own tokenizer: refuse when there is none to use."""
        if self.checkpoint and given is None and self.own_tokenizer is None:
            raise OpenLLMError(
                f"cannot resume {self.path}: it has no tokenizer beside it (converted without one), and training a "
                "new one would not match its embeddings; give the model's tokenizer with --tokenizer-dir PATH"
            )

    def check_prepared_text(self, source: Path) -> None:
        """Refuse to resume on text other than the one the run's dataset was prepared from, unless allowed."""
        if self.checkpoint and not self.cfg.allow_data_change:
            raise OpenLLMError(
                f"cannot resume: {source} (or its settings) differs from the text this run was "
                "prepared from; pass --allow-data-change to continue on new data"
            )

    def build_model_config(self, vocab_size: int) -> ModelConfig:
        """The model to train: the checkpoint's own shape when it keeps it (converted ones need no preset), else
        the preset's with the tokenizer's vocabulary."""
        cfg, given = self.cfg, self.given
        if self.start is not None and self.checkpoint is None:  # the base model, its vocabulary grown by chat tokens
            base = self.start.model_config
            if vocab_size < base.vocab_size:
                raise OpenLLMError(f"the tokenizer has {vocab_size} tokens, fewer than the model's {base.vocab_size}")
            return base.replace(vocab_size=vocab_size, dropout=cfg.dropout)
        if not self.model_config:
            return model_config_for(cfg.model_size, vocab_size=vocab_size, arch=cfg.arch, dropout=cfg.dropout)
        config = ModelConfig.from_dict(self.model_config, dropout=cfg.dropout)
        if given.get("arch") and given["arch"] != config.arch:
            raise OpenLLMError(
                f"cannot resume: the checkpoint's model is arch {config.arch}, not {given['arch']} "
                "(give --model-size too to start a new model)"
            )
        if config.vocab_size != vocab_size:
            raise OpenLLMError(
                f"cannot resume: the model's vocabulary is {config.vocab_size} tokens but the "
                f"dataset's tokenizer has {vocab_size}"
            )
        return config

    def check_compatible(self, model_config: ModelConfig, tokenizer_sha: str, dataset_fp: str, say: Say) -> None:
        """Refuse a resume whose model, tokenizer or (unless allowed) dataset differs from the checkpoint's; warn
        when the batch shape or seed changed."""
        view = self.checkpoint
        if view is None:
            return
        old = ModelConfig.from_dict(view.model_config or {}).to_dict()  # fields newer than the file: their defaults
        diffs = [
            f"{k} {old.get(k)!r} -> {v!r}"
            for k, v in model_config.to_dict().items()
            if k != "dropout" and old.get(k) != v
        ]
        if diffs:
            raise OpenLLMError(f"cannot resume: the model config differs from the checkpoint's ({', '.join(diffs)})")
        old_tok = view.tokenizer_sha256
        if old_tok and old_tok != tokenizer_sha:
            raise OpenLLMError(
                f"cannot resume: the tokenizer differs from the checkpoint's (sha256 {old_tok[:12]}... -> "
                f"{tokenizer_sha[:12]}...)"
            )
        old_fp = view.dataset_fingerprint
        if old_fp and old_fp != dataset_fp:
            if not self.cfg.allow_data_change:
                raise OpenLLMError(
                    f"cannot resume: the dataset differs from the one the checkpoint trained on (fingerprint "
                    f"{old_fp[:12]}... -> {dataset_fp[:12]}...); pass --allow-data-change to continue on new data"
                )
            say("warning: training continues on a different dataset (--allow-data-change)")
        old_tc = view.training_config
        changed = [
            k
            for k in ("batch_size", "seq_len", "gradient_accumulation_steps", "seed")
            if k in old_tc and old_tc[k] != getattr(self.cfg, k)
        ]
        if changed:
            say(
                f"warning: {', '.join(changed)} changed since the checkpoint; the run continues but is not "
                "bit-identical to an uninterrupted one"
            )

    def use_recorded_threads(self, say: Say) -> None:
        """Resume with the CPU thread count the run was recorded with: CPU kernels split their sums by thread,
        so the same count is part of what makes a resumed run bit-identical to an uninterrupted one."""
        recorded = self.checkpoint.training_config.get("torch_threads") if self.checkpoint else None
        if isinstance(recorded, int) and recorded > 0 and recorded != torch.get_num_threads():
            say(f"using {recorded} CPU threads as the run recorded (this process had {torch.get_num_threads()})")
            torch.set_num_threads(recorded)

    def continue_run(self, run: Run, say: Say) -> None:
        """Put the checkpoint's state into the freshly built ``run`` and say what differs from the recorded run."""
        view = self.checkpoint
        if view is None:
            return
        restore(run, view.data)
        run.origin = ck.provenance_origin(view.data)
        note_validation_change(run, view, say)
        note_schedule_change(run, view, say)
        run.last_checkpoint = self.path
        run.state.resumed_from.append(f"{self.path} (step {run.state.step})")
        if (view.world_size or 1) != run.dist.world_size:
            say(
                f"warning: resuming with {run.dist.world_size} processes, the checkpoint was written by "
                f"{view.world_size}: the data position carries over as a global token offset, but the run will "
                "not be bit-identical to an uninterrupted one"
            )
        if view.training_config.get("fsdp") and not run.cfg.fsdp and run.dist.enabled:
            say(
                "note: the checkpoint was written under --fsdp; these processes replicate the model (DDP): give "
                "--fsdp to shard it again"
            )
        say(f"resumed from {self.path} at step {run.state.step}")


def plan(options: TrainConfig | RunConfig, log: Say) -> ResumePlan:
    """Find and verify what ``options`` resume, and resolve them with what the checkpoint recorded."""
    given, run_dir = options.given(), options.run_dir()
    path, ckpt = find_resume(options.resume, run_dir, log)
    if ckpt is None:
        return ResumePlan(resolve(options), given, run_dir)
    view = ck.read_info(ckpt)
    cfg = resolve(options, view.training_config)
    reason = already_done(view, cfg)
    keep_shape = not given.get("model_size")
    if keep_shape and view.model_config:  # the training config records the architecture the run has
        cfg = cfg.replace(arch=ModelConfig.from_dict(view.model_config).arch)
    return ResumePlan(
        cfg,
        given,
        run_dir,
        path,
        view,
        keep_shape=keep_shape,
        own_tokenizer=find_tokenizer(path.parent) if path is not None else None,
        # (without final_model.pt the run died while finishing: go on and finish it)
        finished=reason if reason and (run_dir / rundir.FINAL).is_file() else None,
    )


def base_model(plan: ResumePlan, start: Callable[[str], StartingPoint]) -> StartingPoint:
    """The base model of a fine-tune: --model for a new one; for a resumed LoRA run, the base its checkpoint
    names, which must still be the weights the adapters were trained on."""
    view = plan.checkpoint
    parts = view.lora if view is not None else None
    if parts is None:
        return start(str(plan.cfg.base_model))
    origin = str(plan.path)
    if not parts.base_path.exists():
        raise parts.base_missing(origin)
    base = start(str(parts.base_path))
    ck.check_lora_base(cast(ck.CheckpointView, view), base.sha256, origin)
    return base


def find_resume(resume: str | None, run_dir: Path, log: Say) -> tuple[Path | None, dict | None]:
    if resume is None:
        existing = rundir.resume_candidates(run_dir) if run_dir.is_dir() else []
        if existing:
            raise OpenLLMError(
                f"{run_dir} already holds a training run ({existing[0].name}); continue it with "
                "--resume auto, or choose another --output-dir"
            )
        return None, None
    if resume == "auto":
        found = rundir.find_resumable(run_dir, warn=log)
        if found is None:
            if rundir.resume_candidates(run_dir):
                raise OpenLLMError(f"no checkpoint in {run_dir} verifies; nothing to resume from")
            log(f"--resume auto: no checkpoint in {run_dir} yet; starting a new run")
            return None, None
        return found
    path = Path(resume)
    if path.is_dir():
        found = rundir.find_resumable(path, warn=log)
        if found is None:
            raise OpenLLMError(f"no checkpoint in {path} verifies; nothing to resume from")
        return found
    return path, ck.load_verified(path, "resume from")


def already_done(view: ck.CheckpointView, cfg: RunConfig) -> str | None:
    saved = view.run_state
    if saved.get("stopped") and not cfg.reset_early_stopping:
        return (
            f"this run already stopped: {saved.get('stop_reason')}. Nothing to do; pass --reset-early-stopping "
            "to train on anyway."
        )
    if (view.step or 0) >= cfg.max_steps:
        return (
            f"the checkpoint is at step {view.step}, already at --max-steps {cfg.max_steps}; "
            "raise --max-steps to train on"
        )
    return None


def restore(run: Run, ckpt: dict) -> None:
    """Load model, optimizer, scaler, RNG and progress from a checkpoint into ``run`` (a resume, or the
    rollback after non-finite steps)."""
    view = ck.read_info(ckpt)
    # (whole tensors, from a file or a sharded directory read whole, cut to this process's shards under --fsdp)
    state = model_state_for(run.raw_model, view.model_state or {})
    if has_lora(run.raw_model):  # the adapters (and tensors trained along); the base came from its own file
        load_adapters(run.raw_model, state)
    else:
        run.raw_model.load_state_dict(state)
    opt_state = view.optimizer_state
    if view.has_optimizer_state:
        # the state's layout says which optimizer made it: Muon + AdamW keep one part each (optim.MuonAdamW)
        trained = "muon" if set(opt_state) == {"muon", "adamw"} else "adamw"
        if trained != run.cfg.optimizer:
            raise OpenLLMError(
                f"the checkpoint was trained with --optimizer {trained}; resume with --optimizer {trained} "
                "(or start a new run)"
            )
        # the checkpoint gives the moments; the settings (weight decay, betas, fused) are this run's
        settings = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
        try:
            run.optimizer.load_state_dict(optimizer_state_for(run.optimizer, opt_state))
        except (ValueError, KeyError) as exc:
            reason = f"it lacks {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
            raise OpenLLMError(
                f"the checkpoint's optimizer state does not fit this model and --optimizer {run.cfg.optimizer} "
                f"({reason})"
            ) from None
        for group, own in zip(run.optimizer.param_groups, settings, strict=True):
            group.update(own)
    elif run.dist.is_main:
        run.log("note: the checkpoint has no optimizer state; starting with a fresh AdamW state")
    run.state = ck.restore_run_state(ckpt, run.global_batch)
    if not run.state.stopped:
        run.state.stop_reason = None  # "reached --max-steps" of the earlier invocation no longer holds
    if view.grad_scaler_state and run.scaler.is_enabled():
        run.scaler.load_state_dict(view.grad_scaler_state)
    rng = view.rng_state
    if rng is not None and (view.world_size or 1) == run.dist.world_size and not run.dist.enabled:
        ck.restore_rng_state(rng)


def note_validation_change(run: Run, view: ck.CheckpointView, say: Say) -> None:
    """Losses on different validation text are not comparable: start the best-model record afresh."""
    old = view.training_config.get("validation_fingerprint")
    st = run.state
    if old and old != run.validation_fingerprint and math.isfinite(st.best_validation_loss):
        say(
            f"the validation text differs from the one this run was validated on: its best loss "
            f"{st.best_validation_loss:.4f} (step {st.best_step}) is not comparable, so the best model is chosen "
            "afresh from the next evaluation"
        )
        st.best_validation_loss, st.best_step, st.bad_evals = math.inf, None, 0


def note_schedule_change(run: Run, view: ck.CheckpointView, say: Say) -> None:
    """Say when a resume changes the learning-rate schedule (e.g. --max-steps raised after the run ended)."""
    old = view.scheduler_state
    if "max_lr" not in old:
        return  # imported weights: no schedule to compare with
    was = ScheduleOptions(
        learning_rate=old["max_lr"],
        min_lr=old["min_lr"],
        warmup_steps=old["warmup_steps"],
        max_steps=old["max_steps"],
        lr_decay_steps=old.get("decay_steps"),
        lr_schedule=old.get("schedule", "cosine"),
        cooldown_fraction=old.get("cooldown_fraction", 0.2),
    )
    # every step still to run is compared (at most 10,000 of them, evenly spread), not just the next one: a
    # smaller --max-steps moves a WSD cooldown or a cosine decay to steps the run has not reached yet
    first, last = run.state.step + 1, run.cfg.max_steps
    stride = max(1, (last - first + 1) // 10_000)
    for step in [*range(first, last + 1, stride), last]:
        before, after = lr_at(step, was), lr_at(step, run.cfg.schedule)
        if not math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
            say(
                f"note: the learning-rate schedule changes with this resume: step {step} gets lr {after:.3g} "
                f"where the recorded schedule gave {before:.3g} ({describe_schedule(run.cfg.schedule)})"
            )
            return
