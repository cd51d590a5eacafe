"""Turn a :class:`TrainConfig` into a ready :class:`~openllm.training.run.Run`: plan the resume
(:mod:`openllm.training.resume` decides everything about the checkpoint continued), prepare or open the
data, and build the model, optimizer and batches."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch

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
from openllm.model.config import ModelConfig, get_preset
from openllm.model.scoring import encode_file
from openllm.training import records, resume
from openllm.training.config import DistributedOptions, InputOptions, ModelOptions, RunConfig, TrainConfig
from openllm.training.distributed import DistInfo, barrier, init_distributed
from openllm.training.metrics import peak_flops_for
from openllm.training.optim import configure_optimizer, seed_everything
from openllm.training.resume import ResumePlan
from openllm.training.run import Run

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt"


def setup(options: TrainConfig | RunConfig, log: Callable[[str], None] = print) -> Run | None:
    """The run ``options`` describe, ready to train; None when a resumed run has nothing left to do."""
    plan = resume.plan(options, log)
    cfg, run_dir = plan.cfg, plan.run_dir
    device, dist = start_processes(cfg.distributed)
    say = log if dist.is_main else (lambda _m: None)
    if plan.finished:
        if dist.is_main and records.complete_finished_run(run_dir):
            say("wrote the model card and training curves that the finished run had not written yet")
        say(plan.finished)
        return None
    check_fits(plan, device)
    dataset, model_config = prepare_inputs(plan, dist, say)
    plan.use_recorded_threads(say)
    run = build_run(plan, dataset, model_config, device, dist, say)
    plan.continue_run(run, say)
    if dist.is_main:
        records.write_run_files(run)
    barrier(dist)
    n = run.raw_model.num_parameters()
    say(
        f"training {cfg.model_size} ({n / 1e6:.2f}M parameters) on {device} "
        f"({str(run.autocast_dtype).replace('torch.', '')}), {dist.world_size} process(es), "
        f"{run.global_batch * cfg.seq_len:,} tokens/step, steps {run.state.step + 1}..{cfg.max_steps}, output {run_dir}"
    )
    say(f"precision: {describe_precision(run.autocast_dtype, run.optimizer, device)}")
    return run


def start_processes(cfg: DistributedOptions) -> tuple[torch.device, DistInfo]:
    """The device this process trains on, and its place among the processes (one, without torchrun)."""
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device, dist


def check_fits(plan: ResumePlan, device: torch.device) -> None:
    """Refuse, before anything is written, a sequence longer than the model's context, a batch whose
    activations would not fit in memory, or a missing --validation-data file."""
    cfg = plan.cfg
    if cfg.seq_len > plan.context:
        raise OpenLLMError(f"--seq-len {cfg.seq_len} is above the model's context of {plan.context} tokens")
    check_memory(cfg.model, cfg.inputs, plan.model_config, device)
    if cfg.data and cfg.validation_data and not Path(cfg.validation_data).is_file():
        raise OpenLLMError(f"--validation-data file not found: {cfg.validation_data}")


def prepare_inputs(plan: ResumePlan, dist: DistInfo, say: Callable[[str], None]) -> tuple[PreparedDataset, ModelConfig]:
    """The dataset (prepared into the run directory when needed) and the model config, checked against the
    checkpoint resumed. A refused resume leaves nothing behind: what this call created is removed again."""
    run_dir = plan.run_dir
    new_dir, new_cache = not run_dir.exists(), not (run_dir / "dataset").exists()
    if dist.is_main:
        ensure_dir(run_dir)
    try:
        dataset = resolve_data(plan, dist, log=say)
        model_config = plan.build_model_config(dataset.tokenizer.vocab_size)
        plan.check_compatible(model_config, dataset.tokenizer.sha256, dataset.fingerprint, say)
    except OpenLLMError:
        if dist.is_main and new_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif dist.is_main and new_cache:
            shutil.rmtree(run_dir / "dataset", ignore_errors=True)
        raise
    return dataset, model_config


def build_run(
    plan: ResumePlan,
    dataset: PreparedDataset,
    model_config: ModelConfig,
    device: torch.device,
    dist: DistInfo,
    say: Callable[[str], None],
) -> Run:
    """A new run: seeded model, optimizer, scaler, batch sampler and validation batches (its state is step 0
    until :meth:`ResumePlan.continue_run` restores the checkpoint's)."""
    cfg, tokenizer = plan.cfg, dataset.tokenizer
    seed_everything(cfg.seed + dist.rank)
    dtype = resolve_dtype(cfg.dtype, device, get_preset(cfg.model_size).cpu_dtype)
    warning = emulated_precision_warning(dtype, device)
    if warning and dist.is_main:
        say(warning)
    raw = build_model(model_config).to(device)
    raw.activation_checkpointing = bool(cfg.activation_checkpointing)
    # (torch.compile of a module returns a module, though its annotation says any callable)
    model = cast(torch.nn.Module, torch.compile(raw)) if cfg.compile else raw
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw, cfg.optimization, cfg.learning_rate, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = BatchSampler(dataset.train, cfg.seq_len, cfg.seed)
    if not dataset.meta.get("validation_file") and not cfg.validation_data:
        say(
            f"no --validation-data given: validating on the {dataset.meta['val_documents']:,} documents "
            f"({dataset.meta['val_tokens']:,} tokens) held out from the training text ({dataset.meta['split']})"
        )
    val_tokens = validation_tokens(cfg.inputs, dataset, tokenizer)
    # the same validation windows for any number of processes: eval_batches global batches' worth
    val = EvalBatches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches * dist.world_size, device)
    if not val:
        raise OpenLLMError("the validation split holds no tokens")
    return Run(
        cfg=cfg,
        run_dir=plan.run_dir,
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
        resumed_path=plan.path,
        log=say,
        peak_flops=peak_flops_for(device, cfg.peak_flops),
        validation_fingerprint=token_digest(val_tokens),
    )


def resolve_data(plan: ResumePlan, dist: DistInfo, log: Callable[[str], None]) -> PreparedDataset:
    """A prepared dataset: ``--data``, or ``--data-file`` (or the bundled corpus) prepared into RUN/dataset.

    New text for a resumed model is encoded with the model's own tokenizer (the one beside the checkpoint)
    unless ``--tokenizer-dir`` names another; a tokenizer is trained only for a new model."""
    cfg = plan.cfg
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
    plan.check_tokenizer(tokenizer)
    own = plan.own_tokenizer
    cache = plan.run_dir / "dataset"
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
            if old_key is not None:
                plan.check_prepared_text(source)
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


def token_digest(tokens: np.ndarray, chunk: int = 1 << 24) -> str:
    """sha256 of a token stream's bytes, read a slice at a time (a memmap is never loaded whole)."""
    digest = hashlib.sha256()
    for start in range(0, len(tokens), chunk):
        digest.update(np.ascontiguousarray(tokens[start : start + chunk]).tobytes())
    return digest.hexdigest()


def validation_tokens(cfg: InputOptions, dataset: PreparedDataset, tokenizer: Tokenizer) -> np.ndarray:
    """The token stream validation runs on: ``--validation-data`` encoded with the dataset's tokenizer
    when it is given beside ``--data`` (with ``--data-file`` it was prepared into the dataset), else the
    dataset's held-out split."""
    if cfg.data and cfg.validation_data:
        tokens, _, _ = encode_file(tokenizer, cfg.validation_data)
        return tokens
    return dataset.val


def check_memory(model: ModelOptions, cfg: InputOptions, resumed_config: dict | None, device: torch.device) -> None:
    """Refuse, before writing anything, a batch whose activations alone would not fit in memory."""
    shape = ModelConfig.from_dict(resumed_config) if resumed_config else get_preset(model.model_size).model
    vocab = shape.vocab_size if resumed_config else model.vocab_size
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


def check_before_writing(cfg: TrainConfig | RunConfig) -> None:
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
