"""Turn a :class:`TrainConfig` into a ready :class:`~openllm.training.run.Run`: find what to resume,
prepare or open the data, build the model and optimizer, and refuse mismatched resumes."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.checkpoint.state import RunState
from openllm.core.device import cpu_description, emulated_precision_warning, resolve_device, resolve_dtype
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import ensure_dir
from openllm.core.memory import available_memory
from openllm.data.batches import BatchSampler, EvalBatches
from openllm.data.dataset import PreparedDataset, load_dataset
from openllm.data.prepare import prepare_dataset, prepared_request_key
from openllm.data.tokenizer import Tokenizer, find_tokenizer
from openllm.model import build_model
from openllm.model.config import ModelConfig, get_preset, model_config_for
from openllm.model.scoring import encode_file
from openllm.training import records
from openllm.training.config import TrainConfig
from openllm.training.distributed import DistInfo, barrier, init_distributed
from openllm.training.metrics import peak_flops_for
from openllm.training.optim import configure_optimizer, seed_everything
from openllm.training.run import Run
from openllm.training.schedule import describe_schedule, lr_at

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt"


def setup(cfg: TrainConfig, log: Callable[[str], None] = print) -> Run | None:
    """The run ``cfg`` describes, ready to train; None when a resumed run has nothing left to do."""
    given = cfg.given()
    run_dir = Path(given.get("output_dir") or "runs/openllm")
    resumed_path, ckpt = find_resume(cfg.resume, run_dir, log)
    cfg = cfg.resolved(ckpt.get("training_config") if ckpt else None)
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    say = log if dist.is_main else (lambda _m: None)
    if ckpt and (reason := already_done(ckpt, cfg)) and (run_dir / rundir.FINAL).is_file():
        if dist.is_main and records.complete_finished_run(run_dir):
            say("wrote the model card and training curves that the finished run had not written yet")
        say(reason)
        return None  # (without final_model.pt the run died while finishing: go on and finish it)

    context = (
        ckpt["config"]["block_size"]
        if ckpt and not given.get("model_size")
        else get_preset(cfg.model_size).model.block_size
    )
    if cfg.seq_len > context:  # checked before anything is written
        raise OpenLLMError(f"--seq-len {cfg.seq_len} is above the model's context of {context} tokens")
    check_memory(cfg, ckpt["config"] if ckpt and not given.get("model_size") else None, device)
    if cfg.data and cfg.validation_data and not Path(cfg.validation_data).is_file():
        raise OpenLLMError(f"--validation-data file not found: {cfg.validation_data}")
    new_dir, new_cache = not run_dir.exists(), not (run_dir / "dataset").exists()
    if dist.is_main:
        ensure_dir(run_dir)
    try:  # a refused resume leaves nothing behind: what this call created is removed again
        dataset = resolve_data(cfg, run_dir, dist, ckpt, resumed_path, log=say)
        tokenizer = dataset.tokenizer
        if ckpt and not given.get("model_size"):  # a resumed model keeps its own shape (converted ones need no preset)
            model_config = ModelConfig.from_dict(ckpt["config"], dropout=cfg.dropout)
            if given.get("arch") and given["arch"] != model_config.arch:
                raise OpenLLMError(
                    f"cannot resume: the checkpoint's model is arch {model_config.arch}, not {given['arch']} "
                    "(give --model-size too to start a new model)"
                )
            if model_config.vocab_size != tokenizer.vocab_size:
                raise OpenLLMError(
                    f"cannot resume: the model's vocabulary is {model_config.vocab_size} tokens but the "
                    f"dataset's tokenizer has {tokenizer.vocab_size}"
                )
        else:
            model_config = model_config_for(
                cfg.model_size, vocab_size=tokenizer.vocab_size, arch=cfg.arch, dropout=cfg.dropout
            )
        cfg.arch = model_config.arch  # the training config records the architecture the run has
        if ckpt:
            check_compatible(ckpt, model_config, tokenizer.sha256, dataset.fingerprint, cfg, say)
    except OpenLLMError:
        if dist.is_main and new_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif dist.is_main and new_cache:
            shutil.rmtree(run_dir / "dataset", ignore_errors=True)
        raise

    use_recorded_threads(ckpt, say)
    seed_everything(cfg.seed + dist.rank)
    dtype = resolve_dtype(cfg.dtype, device, get_preset(cfg.model_size).cpu_dtype)
    warning = emulated_precision_warning(dtype, device)
    if warning and dist.is_main:
        say(warning)
    raw = build_model(model_config).to(device)
    raw.activation_checkpointing = bool(cfg.activation_checkpointing)
    model = torch.compile(raw) if cfg.compile else raw
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = BatchSampler(dataset.train, cfg.seq_len, cfg.seed)
    if not dataset.meta.get("validation_file") and not cfg.validation_data:
        say(
            f"no --validation-data given: validating on the {dataset.meta['val_documents']:,} documents "
            f"({dataset.meta['val_tokens']:,} tokens) held out from the training text ({dataset.meta['split']})"
        )
    val_tokens = validation_tokens(cfg, dataset, tokenizer)
    # the same validation windows for any number of processes: eval_batches global batches' worth
    val = EvalBatches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches * dist.world_size, device)
    if not val:
        raise OpenLLMError("the validation split holds no tokens")

    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        dataset=dataset,
        model_config=model_config,
        raw_model=raw,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        sampler=sampler,
        val_batches=val,
        device=device,
        autocast_dtype=dtype,
        dist=dist,
        state=RunState(),
        tokenizer=tokenizer,
        resumed_path=resumed_path,
        log=say,
        peak_flops=peak_flops_for(device, cfg.peak_flops),
        validation_fingerprint=token_digest(val_tokens),
    )
    if ckpt:
        restore(run, ckpt)
        run.origin = ck.provenance_origin(ckpt)
        note_validation_change(run, ckpt, say)
        note_schedule_change(run, ckpt, say)
        run.last_checkpoint = resumed_path
        run.state.resumed_from.append(f"{resumed_path} (step {run.state.step})")
        if ckpt.get("resume_state", {}).get("world_size", 1) != dist.world_size:
            say(
                f"warning: resuming with {dist.world_size} processes, the checkpoint was written by "
                f"{ckpt['resume_state'].get('world_size')}: the data position carries over as a global "
                "token offset, but the run will not be bit-identical to an uninterrupted one"
            )
        say(f"resumed from {resumed_path} at step {run.state.step}")
    if dist.is_main:
        records.write_run_files(run)
    barrier(dist)
    n = raw.num_parameters()
    say(
        f"training {cfg.model_size} ({n / 1e6:.2f}M parameters) on {device} ({str(dtype).replace('torch.', '')}), "
        f"{dist.world_size} process(es), {run.global_batch * cfg.seq_len:,} tokens/step, steps "
        f"{run.state.step + 1}..{cfg.max_steps}, output {run_dir}"
    )
    say(f"precision: {describe_precision(dtype, optimizer, device)}")
    return run


def find_resume(resume: str | None, run_dir: Path, log) -> tuple[Path | None, dict | None]:
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


def already_done(ckpt: dict, cfg: TrainConfig) -> str | None:
    saved = (ckpt.get("resume_state") or {}).get("run_state", {})
    if saved.get("stopped") and not cfg.reset_early_stopping:
        return (
            f"this run already stopped: {saved.get('stop_reason')}. Nothing to do; pass --reset-early-stopping "
            "to train on anyway."
        )
    if int(ckpt["step"]) >= cfg.max_steps:
        return (
            f"the checkpoint is at step {ckpt['step']}, already at --max-steps {cfg.max_steps}; "
            "raise --max-steps to train on"
        )
    return None


def check_compatible(ckpt: dict, model_config, tokenizer_sha: str, dataset_fp: str, cfg: TrainConfig, say) -> None:
    old = ModelConfig.from_dict(ckpt.get("config") or {}).to_dict()  # fields newer than the file: their defaults
    diffs = [
        f"{k} {old.get(k)!r} -> {v!r}" for k, v in model_config.to_dict().items() if k != "dropout" and old.get(k) != v
    ]
    if diffs:
        raise OpenLLMError(f"cannot resume: the model config differs from the checkpoint's ({', '.join(diffs)})")
    old_tok = ckpt.get("tokenizer_sha256")
    if old_tok and old_tok != tokenizer_sha:
        raise OpenLLMError(
            f"cannot resume: the tokenizer differs from the checkpoint's (sha256 {old_tok[:12]}... -> "
            f"{tokenizer_sha[:12]}...)"
        )
    old_fp = ckpt.get("dataset_fingerprint")
    if old_fp and old_fp != dataset_fp:
        if not cfg.allow_data_change:
            raise OpenLLMError(
                f"cannot resume: the dataset differs from the one the checkpoint trained on (fingerprint "
                f"{old_fp[:12]}... -> {dataset_fp[:12]}...); pass --allow-data-change to continue on new data"
            )
        say("warning: training continues on a different dataset (--allow-data-change)")
    old_tc = ckpt.get("training_config") or {}
    changed = [
        k
        for k in ("batch_size", "seq_len", "gradient_accumulation_steps", "seed")
        if k in old_tc and old_tc[k] != getattr(cfg, k)
    ]
    if changed:
        say(
            f"warning: {', '.join(changed)} changed since the checkpoint; the run continues but is not bit-identical "
            "to an uninterrupted one"
        )


def resolve_data(
    cfg: TrainConfig, run_dir: Path, dist: DistInfo, ckpt: dict | None, resumed_path: Path | None, log
) -> PreparedDataset:
    """A prepared dataset: ``--data``, or ``--data-file`` (or the bundled corpus) prepared into RUN/dataset.

    New text for a resumed model is encoded with the model's own tokenizer (the one beside the checkpoint)
    unless ``--tokenizer-dir`` names another; a tokenizer is trained only for a new model."""
    resuming = ckpt is not None
    if cfg.data:
        return load_dataset(cfg.data)
    source = Path(cfg.data_file) if cfg.data_file else BUNDLED_CORPUS
    if not cfg.data_file:
        log(f"no --data or --data-file given: using the bundled corpus {source.name}")
    tokenizer: Path | None = None
    if cfg.tokenizer_dir:
        tokenizer = Path(cfg.tokenizer_dir)
        if not tokenizer.exists():
            raise OpenLLMError(f"--tokenizer-dir not found: {tokenizer}")
        if tokenizer.is_dir() and find_tokenizer(tokenizer) is None:
            raise OpenLLMError(f"no tokenizer in --tokenizer-dir {tokenizer} (tokenizer.model or tokenizer.json)")
    own = find_tokenizer(resumed_path.parent) if resumed_path is not None else None
    if ckpt is not None and tokenizer is None and own is None:
        raise OpenLLMError(
            f"cannot resume {resumed_path}: it has no tokenizer beside it (converted without one), and training a "
            "new one would not match its embeddings; give the model's tokenizer with --tokenizer-dir PATH"
        )
    cache = run_dir / "dataset"
    if dist.is_main:
        meta = cache / "meta.json"
        old_key = None
        if meta.is_file():
            try:
                old_key = load_dataset(cache).meta.get("source_fingerprint")
            except OpenLLMError:
                old_key = None
        settings = (0.1, cfg.seed, "paragraph", cfg.tokenizer_type)
        key = prepared_request_key([source], cfg.validation_data, cfg.vocab_size, tokenizer, *settings)
        if key != old_key and tokenizer is None and own is not None:
            # not the cached preparation of this very run: encode the text with the resumed model's tokenizer
            tokenizer = own
            log(f"encoding {source} with the resumed model's tokenizer ({own})")
            key = prepared_request_key([source], cfg.validation_data, cfg.vocab_size, tokenizer, *settings)
        if old_key != key:
            if old_key is not None and resuming and not cfg.allow_data_change:
                raise OpenLLMError(
                    f"cannot resume: {source} (or its settings) differs from the text this run was "
                    "prepared from; pass --allow-data-change to continue on new data"
                )
            log(f"preparing {source} into {cache}")
            prepare_dataset(
                [source],
                cache,
                vocab_size=cfg.vocab_size,
                validation_file=cfg.validation_data,
                tokenizer=tokenizer,
                tokenizer_type=cfg.tokenizer_type,
                seed=cfg.seed,
                force=True,
            )
    barrier(dist)
    return load_dataset(cache)


def restore(run: Run, ckpt: dict) -> None:
    """Load model, optimizer, scaler, RNG and progress from a checkpoint into ``run``."""
    run.raw_model.load_state_dict(ckpt["model_state_dict"])
    opt_state = ckpt.get("optimizer_state_dict") or {}
    if ck.has_optimizer_state(opt_state):
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
            run.optimizer.load_state_dict(opt_state)
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
    resume = ckpt.get("resume_state") or {}
    if resume.get("grad_scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(resume["grad_scaler"])
    if "rng" in resume and resume.get("world_size", 1) == run.dist.world_size and not run.dist.enabled:
        ck.restore_rng_state(resume["rng"])


def use_recorded_threads(ckpt: dict | None, say: Callable[[str], None]) -> None:
    """Resume with the CPU thread count the run was recorded with: CPU kernels split their sums by thread,
    so the same count is part of what makes a resumed run bit-identical to an uninterrupted one."""
    recorded = ((ckpt or {}).get("training_config") or {}).get("torch_threads")
    if isinstance(recorded, int) and recorded > 0 and recorded != torch.get_num_threads():
        say(f"using {recorded} CPU threads as the run recorded (this process had {torch.get_num_threads()})")
        torch.set_num_threads(recorded)


def token_digest(tokens: np.ndarray, chunk: int = 1 << 24) -> str:
    """sha256 of a token stream's bytes, read a slice at a time (a memmap is never loaded whole)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), chunk):
        digest.update(np.ascontiguousarray(tokens[start : start + chunk]).tobytes())
    return digest.hexdigest()


def validation_tokens(cfg: TrainConfig, dataset: PreparedDataset, tokenizer: Tokenizer) -> np.ndarray:
    """The token stream validation runs on: ``--validation-data`` encoded with the dataset's tokenizer
    when it is given beside ``--data`` (with ``--data-file`` it was prepared into the dataset), else the
    dataset's held-out split."""
    if cfg.data and cfg.validation_data:
        tokens, _, _ = encode_file(tokenizer, cfg.validation_data)
        return tokens
    return dataset.val


def note_validation_change(run: Run, ckpt: dict, say: Callable[[str], None]) -> None:
    """Losses on different validation text are not comparable: start the best-model record afresh."""
    old = (ckpt.get("training_config") or {}).get("validation_fingerprint")
    st = run.state
    if old and old != run.validation_fingerprint and math.isfinite(st.best_validation_loss):
        say(
            f"the validation text differs from the one this run was validated on: its best loss "
            f"{st.best_validation_loss:.4f} (step {st.best_step}) is not comparable, so the best model is chosen "
            "afresh from the next evaluation"
        )
        st.best_validation_loss, st.best_step, st.bad_evals = math.inf, None, 0


def note_schedule_change(run: Run, ckpt: dict, say: Callable[[str], None]) -> None:
    """Say when a resume changes the learning-rate schedule (e.g. --max-steps raised after the run ended)."""
    old = ckpt.get("scheduler_state_dict") or {}
    if "max_lr" not in old:
        return  # imported weights: no schedule to compare with
    was = TrainConfig(
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
        before, after = lr_at(step, was), lr_at(step, run.cfg)
        if not math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
            say(
                f"note: the learning-rate schedule changes with this resume: step {step} gets lr {after:.3g} "
                f"where the recorded schedule gave {before:.3g} ({describe_schedule(run.cfg)})"
            )
            return


def check_memory(cfg: TrainConfig, resumed_config: dict | None, device: torch.device) -> None:
    """Refuse, before writing anything, a batch whose activations alone would not fit in memory."""
    shape = ModelConfig.from_dict(resumed_config) if resumed_config else get_preset(cfg.model_size).model
    vocab = shape.vocab_size if resumed_config else cfg.vocab_size
    tokens = cfg.batch_size * cfg.seq_len
    # float32 bytes kept for the backward pass per token: ~16 values of width C per layer, and the logits
    # (with their gradient and the softmax) over the vocabulary
    need = tokens * 4 * (shape.n_layer * 16 * shape.n_embd + 3 * vocab)
    free = available_memory(device)
    if free and need > free:
        raise OpenLLMError(
            f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} needs about {need / 2**30:.1f} GiB for "
            f"activations, more than the {free / 2**30:.1f} GiB available; lower --batch-size (and raise "
            "--gradient-accumulation-steps to keep the tokens per step)"
        )


def check_before_writing(cfg: TrainConfig) -> None:
    """The checks that need no checkpoint, done before the run directory (or its lock) is touched: option
    values, and every input file or directory named, all missing ones reported together."""
    if not cfg.resume:
        cfg.resolved()
    wanted = [
        ("--data", cfg.data, Path.is_dir),
        ("--data-file", cfg.data_file, Path.is_file),
        ("--validation-data", cfg.validation_data, Path.is_file),
        ("--tokenizer-dir", cfg.tokenizer_dir, Path.is_dir),
    ]
    missing = [f"{flag} {path}" for flag, path, exists in wanted if isinstance(path, str) and not exists(Path(path))]
    if missing:
        raise OpenLLMError(f"not found: {'; '.join(missing)}")


def describe_precision(dtype: torch.dtype, optimizer, device: torch.device) -> str:
    """What the run computes in and why, for its first lines: the autocast dtype, Muon's orthogonalisation
    precision, and the processor that decided them."""
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    parts = [f"{name(dtype)} autocast" if dtype != torch.float32 else "float32"]
    muon = getattr(optimizer, "parts", {}).get("muon")
    if muon is not None:
        parts.append(f"Muon orthogonalises in {name(muon.ns_dtype)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    return f"{', '.join(parts)} ({where})"
