"""Turn a :class:`TrainConfig` into a ready :class:`~openllm.train.Run`: find what to resume,
prepare or open the data, build the model and optimizer, and refuse mismatched resumes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from openllm import checkpoint as ck
from openllm import rundir
from openllm.config import ModelConfig, TrainConfig, get_preset, model_config_for
from openllm.data import (BatchSampler, PreparedDataset, eval_batches, load_dataset, prepare_dataset,
                          prepared_request_key)
from openllm.distributed import DistInfo, barrier, init_distributed
from openllm.errors import OpenLLMError
from openllm.fileio import ensure_dir
from openllm.metrics import peak_flops_for
from openllm.model import GPT
from openllm.tokenizer import load_tokenizer

BUNDLED_CORPUS = Path(__file__).parent / "corpus" / "tinyshakespeare.txt"


def setup(cfg: TrainConfig, log: Callable[[str], None] = print):
    from openllm.train import Run, RunState, restore

    given = cfg.given()
    run_dir = Path(given.get("output_dir") or "runs/openllm")
    resumed_path, ckpt = find_resume(cfg.resume, run_dir, log)
    cfg = cfg.resolved(ckpt.get("training_config") if ckpt else None)
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    say = log if dist.is_main else (lambda _m: None)
    if ckpt and (reason := already_done(ckpt, cfg)) and (run_dir / ck.FINAL).is_file():
        say(reason)
        return None  # (without final_model.pt the run died while finishing: go on and finish it)

    context = (ckpt["config"]["block_size"] if ckpt and not given.get("model_size")
               else get_preset(cfg.model_size).model.block_size)
    if cfg.seq_len > context:  # checked before anything is written
        raise OpenLLMError(f"--seq-len {cfg.seq_len} is above the model's context of {context} tokens")
    if dist.is_main:
        ensure_dir(run_dir)
    dataset = resolve_data(cfg, run_dir, dist, resuming=ckpt is not None, log=say)
    tokenizer = load_tokenizer(dataset.tokenizer_path)
    if ckpt and not given.get("model_size"):  # a resumed model keeps its own shape (converted ones need no preset)
        model_config = ModelConfig.from_dict({**ckpt["config"], "dropout": cfg.dropout})
        if model_config.vocab_size != tokenizer.vocab_size:
            raise OpenLLMError(f"cannot resume: the model's vocabulary is {model_config.vocab_size} tokens but the "
                               f"dataset's tokenizer has {tokenizer.vocab_size}")
    else:
        model_config = model_config_for(cfg.model_size, vocab_size=tokenizer.vocab_size, dropout=cfg.dropout)
    if ckpt:
        check_compatible(ckpt, model_config, tokenizer.sha256, dataset.fingerprint, cfg, say)

    seed_everything(cfg.seed + dist.rank)
    dtype = resolve_dtype(cfg.dtype, device, get_preset(cfg.model_size).cpu_dtype)
    raw = GPT(model_config).to(device)
    raw.activation_checkpointing = cfg.activation_checkpointing
    model = torch.compile(raw) if cfg.compile else raw
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = BatchSampler(dataset.train, cfg.seq_len, cfg.seed)
    if not dataset.meta.get("validation_file"):
        say(f"no --validation-data given: validating on the {dataset.meta['val_documents']:,} documents "
            f"({dataset.meta['val_tokens']:,} tokens) held out from the training text ({dataset.meta['split']})")
    # the same validation windows for any number of processes: eval_batches global batches' worth
    val = [(x.to(device), y.to(device))
           for x, y in eval_batches(dataset.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches * dist.world_size)]
    if not val:
        raise OpenLLMError("the validation split holds no tokens")

    run = Run(cfg=cfg, run_dir=run_dir, dataset=dataset, model_config=model_config, raw_model=raw, model=model,
              optimizer=optimizer, scaler=scaler, sampler=sampler, val_batches=val, device=device,
              autocast_dtype=dtype, dist=dist, state=RunState(), tokenizer_sha256=tokenizer.sha256,
              resumed_path=resumed_path, log=say, peak_flops=peak_flops_for(device, cfg.peak_flops))
    if ckpt:
        restore(run, ckpt)
        run.last_checkpoint = resumed_path
        run.state.resumed_from.append(f"{resumed_path} (step {run.state.step})")
        if ckpt.get("resume_state", {}).get("world_size", 1) != dist.world_size:
            say(f"warning: resuming with {dist.world_size} processes, the checkpoint was written by "
                f"{ckpt['resume_state'].get('world_size')}: the data position carries over as a global "
                "token offset, but the run will not be bit-identical to an uninterrupted one")
        say(f"resumed from {resumed_path} at step {run.state.step}")
    if dist.is_main:
        rundir.write_run_files(run, tokenizer)
    barrier(dist)
    n = raw.num_parameters()
    say(f"training {cfg.model_size} ({n / 1e6:.2f}M parameters) on {device} ({str(dtype).replace('torch.', '')}), "
        f"{dist.world_size} process(es), {run.global_batch * cfg.seq_len:,} tokens/step, steps "
        f"{run.state.step + 1}..{cfg.max_steps}, output {run_dir}")
    return run


def find_resume(resume: str | None, run_dir: Path, log) -> tuple[Path | None, dict | None]:
    if resume is None:
        existing = ck.resume_candidates(run_dir) if run_dir.is_dir() else []
        if existing:
            raise OpenLLMError(f"{run_dir} already holds a training run ({existing[0].name}); continue it with "
                               "--resume auto, or choose another --output-dir")
        return None, None
    if resume == "auto":
        found = ck.find_resumable(run_dir, warn=log)
        if found is None:
            if ck.resume_candidates(run_dir):
                raise OpenLLMError(f"no checkpoint in {run_dir} verifies; nothing to resume from")
            log(f"--resume auto: no checkpoint in {run_dir} yet; starting a new run")
            return None, None
        return found
    path = Path(resume)
    if path.is_dir():
        found = ck.find_resumable(path, warn=log)
        if found is None:
            raise OpenLLMError(f"no checkpoint in {path} verifies; nothing to resume from")
        return found
    ckpt = ck.load_checkpoint(path)
    v = ck.verify_checkpoint(path, ckpt)
    if not v.ok:
        raise OpenLLMError(f"cannot resume from {path}: {'; '.join(v.problems)}")
    return path, ckpt


def already_done(ckpt: dict, cfg: TrainConfig) -> str | None:
    saved = (ckpt.get("resume_state") or {}).get("run_state", {})
    if saved.get("stopped") and not cfg.reset_early_stopping:
        return (f"this run already stopped: {saved.get('stop_reason')}. Nothing to do; pass --reset-early-stopping "
                "to train on anyway.")
    if int(ckpt["step"]) >= cfg.max_steps:
        return f"the checkpoint is at step {ckpt['step']}, already at --max-steps {cfg.max_steps}; raise --max-steps to train on"
    return None


def check_compatible(ckpt: dict, model_config, tokenizer_sha: str, dataset_fp: str, cfg: TrainConfig, say) -> None:
    old = ckpt.get("config") or {}
    diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in model_config.to_dict().items()
             if k != "dropout" and old.get(k) != v]
    if diffs:
        raise OpenLLMError(f"cannot resume: the model config differs from the checkpoint's ({', '.join(diffs)})")
    old_tok = ckpt.get("tokenizer_sha256")
    if old_tok and old_tok != tokenizer_sha:
        raise OpenLLMError(f"cannot resume: the tokenizer differs from the checkpoint's (sha256 {old_tok[:12]}... -> "
                           f"{tokenizer_sha[:12]}...)")
    old_fp = ckpt.get("dataset_fingerprint")
    if old_fp and old_fp != dataset_fp:
        if not cfg.allow_data_change:
            raise OpenLLMError(f"cannot resume: the dataset differs from the one the checkpoint trained on (fingerprint "
                               f"{old_fp[:12]}... -> {dataset_fp[:12]}...); pass --allow-data-change to continue on new data")
        say("warning: training continues on a different dataset (--allow-data-change)")
    old_tc = ckpt.get("training_config") or {}
    changed = [k for k in ("batch_size", "seq_len", "gradient_accumulation_steps", "seed")
               if k in old_tc and old_tc[k] != getattr(cfg, k)]
    if changed:
        say(f"warning: {', '.join(changed)} changed since the checkpoint; the run continues but is not bit-identical "
            "to an uninterrupted one")


def resolve_data(cfg: TrainConfig, run_dir: Path, dist: DistInfo, resuming: bool, log) -> PreparedDataset:
    """A prepared dataset: ``--data``, or ``--data-file`` (or the bundled corpus) prepared into RUN/dataset."""
    if cfg.data:
        return load_dataset(cfg.data)
    source = Path(cfg.data_file) if cfg.data_file else BUNDLED_CORPUS
    if not cfg.data_file:
        log(f"no --data or --data-file given: using the bundled corpus {source.name}")
    tokenizer = None
    if cfg.tokenizer_dir:
        tokenizer = Path(cfg.tokenizer_dir) / "tokenizer.model"
        if not tokenizer.is_file():
            raise OpenLLMError(f"no tokenizer.model in --tokenizer-dir {cfg.tokenizer_dir}")
    cache = run_dir / "dataset"
    if dist.is_main:
        key = prepared_request_key([source], cfg.validation_data, cfg.vocab_size, tokenizer, 0.1, cfg.seed, "paragraph")
        meta = cache / "meta.json"
        old_key = None
        if meta.is_file():
            try:
                old_key = load_dataset(cache).meta.get("source_fingerprint")
            except OpenLLMError:
                old_key = None
        if old_key != key:
            if old_key is not None and resuming and not cfg.allow_data_change:
                raise OpenLLMError(f"cannot resume: {source} (or its settings) differs from the text this run was "
                                   "prepared from; pass --allow-data-change to continue on new data")
            log(f"preparing {source} into {cache}")
            prepare_dataset([source], cache, vocab_size=cfg.vocab_size, validation_file=cfg.validation_data,
                            tokenizer=tokenizer, seed=cfg.seed, force=True)
    barrier(dist)
    return load_dataset(cache)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OpenLLMError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | None, device: torch.device, cpu_default: str = "float32") -> torch.dtype:
    """The autocast dtype: as asked, else bf16 on CUDA GPUs that have it, else the preset's CPU default
    where the CPU has native bf16, else float32."""
    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        name = cpu_default if cpu_has_native_bf16() else "float32"
    if name == "float16" and device.type != "cuda":
        raise OpenLLMError("--dtype float16 needs a CUDA GPU; use float32 or bfloat16 on the CPU")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, **extra)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
