"""What a checkpoint file, run directory or export holds: ``openllm inspect / compare / verify``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import BEST, resolve_checkpoint_path, step_checkpoints
from openllm.core.errors import OpenLLMError
from openllm.core.extras import require
from openllm.core.fileio import read_json
from openllm.core.numbers import finite_or_none
from openllm.data.tokenizer import load_tokenizer
from openllm.interop.export import GGUF_FILE, HF_FILES
from openllm.interop.families import family, family_of_model_type
from openllm.interop.gguf_file import gguf_metadata, gguf_problems, is_gguf, read_gguf
from openllm.interop.gpt2 import is_export_dir, is_mask_buffer, read_hf_dir
from openllm.interop.hf import import_hf_weights
from openllm.model.config import ModelConfig


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _params(state: dict) -> int:
    """Parameters, counting tied (storage-sharing) tensors once and skipping legacy mask buffers."""
    seen, n = set(), 0
    for k, t in state.items():
        if not isinstance(t, torch.Tensor) or is_mask_buffer(k, t):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            n += t.numel()
    return n


def describe(path: str | os.PathLike, show_damaged: bool = False) -> dict:
    """A summary dict of what ``path`` holds (see :func:`format_description`). A damaged checkpoint (unknown
    format version, checksum mismatch) is refused like everywhere else, unless ``show_damaged``: then it is
    described, with its problems under "damaged" (``openllm inspect``)."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"not found: {path}")
    gguf_file = _gguf_of(path)
    if gguf_file is not None:
        return _describe_gguf(gguf_file, path, show_damaged)
    if is_export_dir(path):
        return _describe_export(path)
    if ck.is_sharded_checkpoint(path):
        return _describe_file(path, _dir_size(path), str(path), show_damaged)
    if path.is_dir() and (path / "pytorch_model.bin").is_file() and not (path / BEST).is_file():
        return _describe_file(path / "pytorch_model.bin", _dir_size(path), str(path), show_damaged)
    if path.is_dir():
        info = _describe_file(resolve_checkpoint_path(path), _dir_size(path), str(path), show_damaged)
        info["files"] = sorted(p.name for p in path.iterdir())
        info["step_checkpoints"] = [s for s, _ in step_checkpoints(path)]
        return info
    return _describe_file(path, path.stat().st_size, str(path), show_damaged)


def _describe_file(file: Path, size: int, label: str, show_damaged: bool = False) -> dict:
    try:
        obj, damaged = ck.load_checkpoint(file, mmap=True), []
    except ck.DamagedCheckpoint as exc:
        if not show_damaged:
            raise
        obj, damaged = exc.checkpoint, exc.problems
    info: dict = {"path": label, "file": str(file), "size_bytes": size}
    if damaged:
        info["damaged"] = damaged
    ci = ck.read_info(obj)
    if ci.model_state is None:
        state = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        info.update(
            {
                "format": "nanoGPT ckpt.pt" if "model_args" in obj else "raw state dict (weights only)",
                "parameters": _params(tensors),
                "tensors": len(tensors),
                "mask_buffers": sum(1 for k, v in tensors.items() if is_mask_buffer(k, v)),
                "optimizer_state": "optimizer" in obj,
                "scheduler_state": False,
                "training_log_entries": 0,
                "validation_log_entries": 0,
                "step": obj.get("iter_num"),
                "best_step": None,
                "best_validation_loss": finite_or_none(float(obj["best_val_loss"])) if "best_val_loss" in obj else None,
                "provenance": "no metadata (weights only)",
            }
        )
        return info
    tlog, vlog = ci.training_log, ci.validation_log
    info.update(
        {
            "format": f"openllm checkpoint v{ci.format_version}" if ci.format_version else "legacy openllm checkpoint",
            "parameters": _params(ci.model_state),
            "optimizer_state": ci.has_optimizer_state,
            "optimizer_note": ci.optimizer_note,
            "scheduler_state": ci.has_scheduler_state,
            "step": ci.step,
            "epoch": ci.epoch,
            "training_log_entries": len(tlog),
            "training_log_last_step": tlog[-1].get("step") if tlog else None,
            "validation_log_entries": len(vlog),
            "validation_log_last_step": vlog[-1].get("step") if vlog else None,
            "best_step": ci.best_step,
            "best_validation_loss": ci.best_validation_loss,
            "last_training_loss": tlog[-1].get("loss") if tlog else None,
            "config": _shown_config(ci.model_config),
            "training_config": ci.training_config,
            "stop_reason": ci.stop_reason,
            "provenance": ci.source,
            "checksum": ci.checksum,
            "library_versions": ci.library_versions,
        }
    )
    if ci.is_lora:
        info["format"] += " with LoRA adapters"
        info["lora"] = _lora_line(ci)
    return info


def _lora_line(ci: ck.CheckpointView) -> str:
    """What a LoRA checkpoint adapts and where its base is ("parameters" counts what the file holds)."""
    try:
        lora = ci.lora
    except OpenLLMError as exc:  # shown, as inspect shows damaged files
        return str(exc)
    assert lora is not None
    c = lora.config
    return (
        f"rank {c.rank}, alpha {c.alpha:g}, dropout {c.dropout:g} on {','.join(c.targets)}; the file holds the "
        f"adapters, the base weights are {lora.base_path} ({lora.base_sha256[:19]}...)"
    )


def _describe_export(path: Path) -> dict:
    cfg, state = read_hf_dir(path)
    meta = cfg.get("openllm") or {}
    model_type = str(cfg.get("model_type"))
    fam = family_of_model_type(model_type)
    return {
        "path": str(path),
        "format": f"Hugging Face {fam.hf_names[model_type] if fam else model_type} directory"
        + (" (openllm export)" if meta else ""),
        "size_bytes": _dir_size(path),
        "parameters": _params(state),
        "optimizer_state": False,
        "scheduler_state": False,
        "step": meta.get("step"),
        "training_log_entries": 0,
        "validation_log_entries": 0,
        "best_step": (meta.get("training_stats") or {}).get("best_step"),
        "best_validation_loss": meta.get("best_validation_loss"),
        "config": {k: cfg.get(k) for k in (fam or family("gpt2")).hf_config_keys},
        "provenance": (meta.get("provenance") or {}).get("source", "unknown") if meta else "Hugging Face",
        "files": sorted(p.name for p in path.iterdir()),
    }


GGUF_CONFIG_KEYS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
)


def _gguf_of(path: Path) -> Path | None:
    """The GGUF file ``path`` is, or the one an export directory holds (beside no checkpoint or HF weights)."""
    if path.is_dir():
        file = path / GGUF_FILE
        return file if file.is_file() and not is_export_dir(path) and not any(path.glob("*.pt")) else None
    return path if is_gguf(path) else None


def _describe_gguf(file: Path, path: Path, show_damaged: bool = False) -> dict:
    reader = read_gguf(file)
    meta = gguf_metadata(reader)
    problems = gguf_problems(reader, meta)
    if problems and not show_damaged:
        raise OpenLLMError(f"{file} is damaged: {'; '.join(problems)}")
    arch = meta.get("general.architecture", "unknown")
    weights = sorted({t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) > 1})
    ours = meta.get("openllm.version")
    info = {
        "path": str(path),
        "file": str(file),
        "format": f"GGUF {arch} model ({'/'.join(weights)} weights)" + (" (openllm export)" if ours else ""),
        "size_bytes": _dir_size(path),
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "optimizer_state": False,
        "scheduler_state": False,
        "step": None,
        "training_log_entries": 0,
        "validation_log_entries": 0,
        "best_step": None,
        "best_validation_loss": None,
        "config": {
            "architecture": arch,
            **{k: meta.get(f"{arch}.{k}") for k in GGUF_CONFIG_KEYS},
            "vocab_size": meta.get("tokenizer.ggml.tokens"),
        },
        "provenance": f"exported by openllm {ours}" if ours else meta.get("general.name", "unknown"),
    }
    if problems:
        info["damaged"] = problems
    if path.is_dir():
        info["files"] = sorted(p.name for p in path.iterdir())
    return info


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _log_line(label: str, info: dict, key: str) -> str:
    return f"  {label}   {_fmt(info.get(key + '_entries'))} entries (last step {_fmt(info.get(key + '_last_step'))})"


def format_description(info: dict) -> str:
    size = info["size_bytes"] / 1e6
    damaged = (
        [f"DAMAGED: {'; '.join(info['damaged'])} (shown here; every other command refuses this file)"]
        if info.get("damaged")
        else []
    )
    lines = [
        *damaged,
        f"{info['path']}",
        f"  format:            {info['format']}",
        f"  size on disk:      {size:,.1f} MB",
        f"  parameters:        {_fmt(info.get('parameters'))}",
        f"  step:              {_fmt(info.get('step'))}",
        f"  optimizer state:   {_fmt(info.get('optimizer_state'))}"
        + (f" ({info['optimizer_note']})" if info.get("optimizer_note") else ""),
        f"  scheduler state:   {_fmt(info.get('scheduler_state'))}",
        _log_line("training log:   ", info, "training_log"),
        _log_line("validation log: ", info, "validation_log"),
        f"  best checkpoint:   step {_fmt(info.get('best_step'))}, "
        f"validation loss {_fmt(info.get('best_validation_loss'))}",
        f"  provenance:        {info.get('provenance')}",
    ]
    if info.get("mask_buffers"):
        lines.append(f"  mask buffers:      {info['mask_buffers']} (legacy causal masks, dropped on conversion)")
    if info.get("lora"):
        lines.append(f"  LoRA:              {info['lora']}")
    if info.get("stop_reason"):
        lines.append(f"  stop reason:       {info['stop_reason']}")
    if info.get("config"):
        lines.append(f"  model config:      {json.dumps(info['config'])}")
    if info.get("step_checkpoints"):
        lines.append(f"  step checkpoints:  {info['step_checkpoints']}")
    return "\n".join(lines)


COMPARE_ROWS = [
    ("format", "format"),
    ("size (MB)", "size_bytes"),
    ("parameters", "parameters"),
    ("step", "step"),
    ("optimizer state", "optimizer_state"),
    ("scheduler state", "scheduler_state"),
    ("training log entries", "training_log_entries"),
    ("validation log entries", "validation_log_entries"),
    ("best step", "best_step"),
    ("best validation loss", "best_validation_loss"),
    ("provenance", "provenance"),
]


def format_comparison(infos: list[dict]) -> str:
    header = ["", *[Path(i["path"]).name or i["path"] for i in infos]]
    rows = [header]
    for label, key in COMPARE_ROWS:
        rows.append([label, *[f"{i[key] / 1e6:,.1f}" if key == "size_bytes" else _fmt(i.get(key)) for i in infos]])
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def verify_path(path: str | os.PathLike) -> list[ck.Verification]:
    """Verify a checkpoint file, every checkpoint of a run directory, an export directory or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"not found: {path}")
    gguf_file = _gguf_of(path)
    if gguf_file is not None:
        return [_verify_gguf(gguf_file)]
    if is_export_dir(path) or ((path / "config.json").is_file() and not any(path.glob("*.pt"))):
        return [_verify_export(path)]
    if ck.is_sharded_checkpoint(path) or not path.is_dir():
        files = [path]
    else:  # a run directory: every checkpoint file, and every sharded step checkpoint
        files = sorted({*path.glob("*.pt"), *(p for _, p in step_checkpoints(path))})
    if not files:
        raise OpenLLMError(f"{path} holds no .pt checkpoint")
    return [ck.verify_checkpoint(f) for f in files]


def _verify_gguf(file: Path) -> ck.Verification:
    """A GGUF file reads whole and holds every tensor its architecture needs (it carries no checksum)."""
    require("gguf", "gguf", "verifying a GGUF file")
    v = ck.Verification(file, ok=False, kind="gguf")
    try:
        reader = read_gguf(file)
        v.problems.extend(gguf_problems(reader, gguf_metadata(reader)))
    except OpenLLMError as exc:
        v.problems.append(str(exc))
    v.ok = not v.problems
    return v


def _verify_export(path: Path) -> ck.Verification:
    """A Hugging Face directory: its config, weights and tokenizer load and fit each other, and an openllm export
    holds every file `openllm export` writes. (Such a directory carries no checksum.)"""
    v = ck.Verification(path, ok=False, kind="hf")
    try:
        cfg, state = read_hf_dir(path)
        meta = cfg.get("openllm") or {}
        v.step = meta.get("step") if isinstance(meta.get("step"), int) else None
        v.problems.extend(f"lacks {name}" for name in (HF_FILES if meta else ()) if not (path / name).is_file())
        config, state = import_hf_weights(cfg, state, str(path))
        v.problems.extend(ck.shape_problems(state, config.to_dict()))
        for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                read_json(path / name, name)
        for name in ("tokenizer.model", "tokenizer.json", "vocab.json"):  # each must load, for whoever reads it
            if (path / name).is_file():
                n = load_tokenizer(path / name, cfg).vocab_size
                if n > config.vocab_size or (meta and n != config.vocab_size):
                    v.problems.append(f"{name} has {n:,} tokens, the model's embedding {config.vocab_size:,}")
    except OpenLLMError as exc:
        v.problems.append(str(exc))
    v.ok = not v.problems
    return v


def _shown_config(config: dict | None) -> dict | None:
    """The model config as the model uses it; a config that does not even build is shown as recorded."""
    try:
        return ModelConfig.from_dict(config).describe() if isinstance(config, dict) else config
    except (OpenLLMError, TypeError, ValueError):
        return config
