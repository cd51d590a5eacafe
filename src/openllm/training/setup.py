"""Turn a :class:`TrainConfig` into a ready :class:`~openllm.training.run.Run`: plan the resume
(:mod:`openllm.training.resume` decides everything about the checkpoint continued), prepare or open the
data, and build the model, optimizer and batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed

from openllm.checkpoint.state import RunState
from openllm.core.device import cpu_description, emulated_precision_warning, resolve_device, resolve_dtype
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import ensure_dir
from openllm.core.memory import available_memory
from openllm.data.batches import BatchSampler, EvalBatches
from openllm.data.chat import with_chat_tokens
from openllm.data.conversations import ConversationSet, load_conversations, prepare_conversations
from openllm.data.dataset import PreparedDataset, load_dataset
from openllm.data.mixture import DatasetMixture, MixtureEvalBatches, MixtureSampler
from openllm.data.prepare import prepare_dataset, prepared_request_key
from openllm.data.sources import expand_inputs, sha256_file
from openllm.data.tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from openllm.model import build_model
from openllm.model.config import ModelConfig, get_preset
from openllm.model.lora import apply_lora
from openllm.model.scoring import encode_file
from openllm.training import records, resume
from openllm.training.chatdata import ConversationEvalBatches, ConversationSampler, split_digest
from openllm.training.config import (
    FINETUNE_LEARNING_RATE,
    FINETUNE_OF_PRETRAINING,
    DistributedOptions,
    InputOptions,
    ModelOptions,
    RunConfig,
    TrainConfig,
)
from openllm.training.distributed import DistInfo, barrier, init_distributed, launched_by_torchrun
from openllm.training.metrics import peak_flops_for
from openllm.training.optim import configure_optimizer, seed_everything
from openllm.training.resume import ResumePlan
from openllm.training.run import Run, StartingPoint
from openllm.training.sharding import shard_model

BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt"


def setup(
    options: TrainConfig | RunConfig,
    log: Callable[[str], None] = print,
    start: Callable[[str], StartingPoint] | None = None,
) -> Run | None:
    """The run ``options`` describe, ready to train; None when a resumed run has nothing left to do. A fine-tune
    (``--model``) that starts anew loads its base model with ``start`` (given by :mod:`openllm.finetune`)."""
    plan = resume.plan(options, log)
    if plan.cfg.finetunes and not plan.finished and (plan.checkpoint is None or plan.checkpoint.is_lora):
        if start is None:
            raise OpenLLMError("a fine-tune (--model) starts through `openllm finetune` (openllm.finetune.finetune)")
        plan = dataclasses.replace(plan, start=resume.base_model(plan, start))
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
    if isinstance(dataset, ConversationSet):
        plan = dataclasses.replace(plan, cfg=fine_tune_steps(plan, len(dataset.train), dist.world_size, say))
        cfg = plan.cfg
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
    dist = init_distributed(device.type, cfg.dist_timeout, group_of_one=cfg.fsdp)
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


def prepare_inputs(
    plan: ResumePlan, dist: DistInfo, say: Callable[[str], None]
) -> tuple[PreparedDataset | ConversationSet | DatasetMixture, ModelConfig]:
    """The dataset (prepared into the run directory when needed) and the model config, checked against the
    checkpoint resumed. A refused resume leaves nothing behind: what this call created is removed again."""
    run_dir = plan.run_dir
    new_dir, new_cache = not run_dir.exists(), not (run_dir / "dataset").exists()
    if dist.is_main:
        ensure_dir(run_dir)
    try:
        dataset = chat_data(plan, dist, say) if plan.cfg.finetunes else resolve_data(plan, dist, log=say)
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
    dataset: PreparedDataset | ConversationSet | DatasetMixture,
    model_config: ModelConfig,
    device: torch.device,
    dist: DistInfo,
    say: Callable[[str], None],
) -> Run:
    """A new run: seeded model, optimizer, scaler, batch sampler and validation batches (its state is step 0
    until :meth:`ResumePlan.continue_run` restores the checkpoint's)."""
    cfg, tokenizer = plan.cfg, dataset.tokenizer
    # every process builds the same initial weights (DDP would broadcast rank 0's; FSDP keeps each process's slice
    # of its own), then draws from its own generators (dropout)
    seed_everything(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device, get_preset(cfg.model_size).cpu_dtype)
    warning = emulated_precision_warning(dtype, device)
    if warning and dist.is_main:
        say(warning)
    raw = build_model(model_config)
    if plan.start is not None:
        grown = load_base_weights(raw, plan.start, say if plan.checkpoint is None else (lambda _m: None))
        if (lora := cfg.finetune.lora()) is not None:
            apply_lora(raw, lora)
            for key in grown:  # the chat tokens' rows are new: their embedding (and head) train along
                raw.get_parameter(key).requires_grad_(True)
    if dist.enabled:
        seed_everything(cfg.seed + dist.rank)
    raw = raw.to(device)
    raw.activation_checkpointing = bool(cfg.activation_checkpointing)
    if cfg.fsdp:  # in place, before the optimizer is built over the (then sharded) parameters
        shard_model(raw, device, dtype)
    # (torch.compile of a module returns a module, though its annotation says any callable)
    model = cast(torch.nn.Module, torch.compile(raw)) if cfg.compile else raw
    if dist.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw, cfg.optimization, cfg.learning_rate, device)
    checkpoint_group = None
    if cfg.fsdp and cfg.async_save:  # background saves talk in a group of their own, apart from training's
        checkpoint_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=cfg.dist_timeout))
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler: BatchSampler | ConversationSampler | MixtureSampler
    val: EvalBatches | ConversationEvalBatches | MixtureEvalBatches
    if isinstance(dataset, DatasetMixture):
        sampler = MixtureSampler([p.train for p in dataset.parts], dataset.weights, cfg.seq_len, cfg.seed)
        parts = {
            n: EvalBatches(p.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches * dist.world_size, device)
            for n, p in zip(dataset.names, dataset.parts, strict=True)
        }
        val = MixtureEvalBatches(parts, dataset.weights)
        # (of the weights too: the mixture's loss is their weighted mean, another weighting another figure)
        record = [[token_digest(p.val), w] for p, w in zip(dataset.parts, dataset.weights, strict=True)]
        fingerprint = hashlib.sha256(json.dumps(record).encode()).hexdigest()
    elif isinstance(dataset, ConversationSet):
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        sampler = ConversationSampler(dataset.train, cfg.seed, pad)
        val = ConversationEvalBatches(dataset.val, cfg.batch_size, cfg.eval_batches * dist.world_size, pad, device)
        fingerprint = split_digest(dataset.val)
    else:
        sampler = BatchSampler(dataset.train, cfg.seq_len, cfg.seed)
        if not dataset.meta.get("validation_file") and not cfg.validation_data:
            say(
                f"no --validation-data given: validating on the {dataset.meta['val_documents']:,} documents "
                f"({dataset.meta['val_tokens']:,} tokens) held out from the training text ({dataset.meta['split']})"
            )
        val_tokens = validation_tokens(cfg.inputs, dataset, tokenizer)
        # the same validation windows for any number of processes: eval_batches global batches' worth
        val = EvalBatches(val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches * dist.world_size, device)
        fingerprint = token_digest(val_tokens)
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
        validation_fingerprint=fingerprint,
        origin=None if plan.start is None else fine_tune_origin(plan.start),
        base=plan.start,
        checkpoint_group=checkpoint_group,
    )


# A new fine-tune warms up over this share of its steps unless --warmup-steps is given.
FINETUNE_WARMUP = 0.03


def fine_tune_steps(plan: ResumePlan, conversations: int, world_size: int, say: Callable[[str], None]) -> RunConfig:
    """A fine-tune's --max-steps from --epochs (a new run, or --epochs given again on resume), and a new run's
    warmup, FINETUNE_WARMUP of its steps, unless given."""
    cfg = plan.cfg
    changes: dict[str, Any] = {}
    if cfg.epochs is not None and (plan.checkpoint is None or "epochs" in plan.given):
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
        changes["max_steps"] = max(1, math.ceil(cfg.epochs * conversations / per_step))
        say(
            f"--epochs {cfg.epochs:g}: {changes['max_steps']:,} steps of {per_step} conversations over "
            f"{conversations:,} training conversations"
        )
    if plan.checkpoint is None and "warmup_steps" not in plan.given:
        changes["warmup_steps"] = round(FINETUNE_WARMUP * changes.get("max_steps", cfg.max_steps))
    pretrained = plan.start.learning_rate if plan.start is not None else None
    if plan.checkpoint is None and "learning_rate" not in plan.given and pretrained:
        full = FINETUNE_OF_PRETRAINING * pretrained
        lr = min(10 * full, FINETUNE_LEARNING_RATE["lora"]) if cfg.lora_rank else full
        changes["learning_rate"] = lr
        if "min_lr" not in plan.given:
            changes["min_lr"] = lr / 10
        say(f"learning rate {lr:g} ({'LoRA: ' if cfg.lora_rank else ''}from the {pretrained:g} the base trained with)")
    return cfg.replace(**changes)


def fine_tune_origin(start: StartingPoint) -> dict:
    """The provenance origin of a fine-tune's weights (checkpoint.format.training_provenance keeps it)."""
    return {"source": f"fine-tuned from {start.source}", "base_sha256": start.sha256, "trained_from_step": 0}


def load_base_weights(model: torch.nn.Module, start: StartingPoint, say: Callable[[str], None]) -> list[str]:
    """A new fine-tune's weights: the base model's, with the rows of tokens the chat template added (embedding
    and, untied, output head) set to the mean of the existing rows, a neutral start that keeps every old
    token's logits as they were up to a shared shift."""
    state = dict(start.state_dict)
    own = model.state_dict()
    grown = []
    for key, value in state.items():
        want = own.get(key)
        if (
            want is not None
            and value.dim() == 2
            and want.shape[1:] == value.shape[1:]
            and want.shape[0] > value.shape[0]
        ):
            rows = value.float().mean(0, keepdim=True).to(value.dtype).expand(want.shape[0] - value.shape[0], -1)
            state[key] = torch.cat([value, rows])
            grown.append(key)
    model.load_state_dict(state)
    say(f"fine-tuning {start.source}" + (f"; {len(grown)} matrices grown by the chat tokens" if grown else ""))
    return grown


def resolve_data(plan: ResumePlan, dist: DistInfo, log: Callable[[str], None]) -> PreparedDataset | DatasetMixture:
    """A prepared dataset: ``--data`` (several: a mixture), or ``--data-file`` (or the bundled corpus) prepared
    into RUN/dataset.

    New text for a resumed model is encoded with the model's own tokenizer (the one beside the checkpoint)
    unless ``--tokenizer-dir`` names another; a tokenizer is trained only for a new model."""
    cfg = plan.cfg
    if cfg.data and len(cfg.data) > 1:
        mixture = DatasetMixture.of([load_dataset(d) for d in cfg.data], cfg.data_weights)
        shares = ", ".join(f"{n} {w:.3g}" for n, w in zip(mixture.names, mixture.weights, strict=True))
        log(f"training on a mixture of {len(mixture.parts)} datasets: {shares}")
        return mixture
    if cfg.data:
        return load_dataset(cfg.data[0])
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
            trained: dict[str, Any] = {}  # what shapes a tokenizer to train, when none is given
            if tokenizer is None:
                trained = {"vocab_size": cfg.vocab_size, "tokenizer_type": cfg.tokenizer_type}
            prepare_dataset(
                [source], cache, validation_file=cfg.validation_data, tokenizer=tokenizer, seed=cfg.seed, force=True,
                **trained,
            )  # fmt: skip
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
    if cfg.data and cfg.validation_data:  # (one dataset: a mixture validates on each one's split)
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
    if cfg.fsdp and not launched_by_torchrun():
        raise OpenLLMError(
            "--fsdp shards the model across the processes torchrun starts, and this process was not started by "
            "torchrun: run torchrun --nproc_per_node N -m openllm train ... (or leave --fsdp out)"
        )
    data = [cfg.data] if isinstance(cfg.data, str) else cfg.data if isinstance(cfg.data, list) else []
    wanted = [
        *(("--data", d, Path.is_dir) for d in data),
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


def chat_data(plan: ResumePlan, dist: DistInfo, say: Callable[[str], None]) -> ConversationSet:
    """A fine-tune's conversations, encoded into RUN/conversations with the model's tokenizer (its chat tokens
    added where it had no template) unless the set there was made from the same files with the same settings.
    A resumed run refuses other conversations unless --allow-data-change."""
    cfg = plan.cfg
    out = plan.run_dir / "conversations"
    if plan.start is not None:
        tokenizer = plan.start.tokenizer
    elif plan.own_tokenizer is not None:
        tokenizer = load_tokenizer(plan.own_tokenizer)
    else:
        raise OpenLLMError(f"cannot resume {plan.path}: no tokenizer beside it")
    files = [str(f) for f in expand_inputs(list(cfg.chat_data or []))]
    val_files = [str(f) for f in expand_inputs([cfg.validation_data])] if cfg.validation_data else []
    request = {
        "inputs": files,
        "validation_data": val_files,
        "max_tokens": cfg.seq_len + 1,
        "overflow": cfg.overflow,
        "train_on": cfg.train_on,
        "split_seed": cfg.seed,
        "tokenizer_sha256": with_chat_tokens(tokenizer).sha256,
    }
    if dist.is_main:
        existing = _existing(out)
        if existing is None or not _made_for(existing, request):
            if existing is not None and plan.checkpoint is not None:
                plan.check_prepared_text(Path(files[0]) if files else out)
            say(f"encoding {len(files)} conversation file(s) into {out}")
            prepare_conversations(
                files,
                tokenizer,
                out,
                validation_data=val_files or None,
                max_tokens=cfg.seq_len + 1,
                overflow=cfg.overflow,
                train_on=cfg.train_on,
                skip_bad_records=cfg.skip_bad_records,
                seed=cfg.seed,
            )
    barrier(dist)
    chats = load_conversations(out)
    stats = chats.stats
    say(
        f"conversations: {stats['train_conversations']:,} training, {stats['val_conversations']:,} validation "
        f"({stats['duplicates_dropped']:,} duplicates dropped, {stats['truncated']:,} truncated, "
        f"{stats['dropped_too_long']:,} too long, {sum(stats['bad_records_skipped'].values()):,} bad records "
        f"skipped); loss on {stats['train_loss_tokens']:,} of {stats['train_tokens']:,} training tokens "
        f"(--train-on {cfg.train_on})"
    )
    return chats


def _existing(out: Path) -> ConversationSet | None:
    try:
        return load_conversations(out) if out.is_dir() else None
    except OpenLLMError:
        return None


def _made_for(chats: ConversationSet, request: dict) -> bool:
    """Whether the set was encoded from exactly these files (by content) with these settings."""
    stats = chats.stats

    def same_files(recorded, paths) -> bool:
        return [r.get("path") for r in recorded] == paths and all(
            r.get("sha256") == sha256_file(Path(p)) for r, p in zip(recorded, paths, strict=True)
        )

    return (
        all(
            stats.get(k) == request[k] for k in ("max_tokens", "overflow", "train_on", "split_seed", "tokenizer_sha256")
        )
        and same_files(stats.get("inputs", []), request["inputs"])
        and same_files(stats.get("validation_data", []), request["validation_data"])
    )
