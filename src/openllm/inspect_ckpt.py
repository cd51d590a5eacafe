"""What a checkpoint file, run directory or export holds: ``openllm inspect / compare / verify``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from openllm import checkpoint as ck
from openllm.errors import OpenLLMError


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _params(state: dict) -> int:
    """Parameters, counting tied (storage-sharing) tensors once and skipping legacy mask buffers."""
    seen, n = set(), 0
    for k, t in state.items():
        if not isinstance(t, torch.Tensor) or (k.endswith(".attn.bias") and t.dim() == 4):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            n += t.numel()
    return n


def _finite(x):
    return x if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else None


def describe(path: str | os.PathLike) -> dict:
    """A summary dict of what ``path`` holds (see :func:`format_description`)."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"not found: {path}")
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / ck.BEST).is_file():
        return _describe_export(path)
    if path.is_dir() and (path / "pytorch_model.bin").is_file() and not (path / ck.BEST).is_file():
        return _describe_file(path / "pytorch_model.bin", size=_dir_size(path), label=str(path))
    if path.is_dir():
        from openllm.loading import resolve_checkpoint_path

        info = _describe_file(resolve_checkpoint_path(path), size=_dir_size(path), label=str(path))
        info["files"] = sorted(p.name for p in path.iterdir())
        info["step_checkpoints"] = [s for s, _ in ck.step_checkpoints(path)]
        return info
    return _describe_file(path, path.stat().st_size, str(path))


def _describe_file(file: Path, size: int, label: str) -> dict:
    obj = ck.load_checkpoint(file, mmap=True)
    info = {"path": label, "file": str(file), "size_bytes": size}
    if "model_state_dict" not in obj:
        state = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        info.update({"format": "nanoGPT ckpt.pt" if "model_args" in obj else "raw state dict (weights only)",
                     "parameters": _params(tensors), "tensors": len(tensors),
                     "mask_buffers": sum(1 for k, v in tensors.items() if k.endswith(".attn.bias") and v.dim() == 4),
                     "optimizer_state": "optimizer" in obj, "scheduler_state": False, "training_log_entries": 0,
                     "validation_log_entries": 0, "step": obj.get("iter_num"), "best_step": None,
                     "best_validation_loss": _finite(float(obj["best_val_loss"])) if "best_val_loss" in obj else None,
                     "provenance": "no metadata (weights only)"})
        return info
    opt = obj.get("optimizer_state_dict") or {}
    tlog, vlog = obj.get("training_log") or [], obj.get("validation_log") or []
    stats = obj.get("training_stats") or {}
    info.update({
        "format": f"openllm checkpoint v{obj['format_version']}" if "format_version" in obj else "legacy openllm checkpoint",
        "parameters": _params(obj["model_state_dict"]),
        "optimizer_state": bool(opt.get("state")),
        "optimizer_note": (obj.get("provenance") or {}).get("optimizer_state"),
        "scheduler_state": bool(obj.get("scheduler_state_dict")),
        "step": obj.get("step"),
        "epoch": obj.get("epoch"),
        "training_log_entries": len(tlog), "training_log_last_step": tlog[-1].get("step") if tlog else None,
        "validation_log_entries": len(vlog), "validation_log_last_step": vlog[-1].get("step") if vlog else None,
        "best_step": stats.get("best_step"), "best_validation_loss": _finite(obj.get("best_validation_loss")),
        "last_training_loss": tlog[-1].get("loss") if tlog else None,
        "config": obj.get("config"), "training_config": obj.get("training_config"),
        "stop_reason": stats.get("stop_reason"),
        "provenance": (obj.get("provenance") or {}).get("source", "unknown (legacy checkpoint)"),
        "checksum": obj.get("checksum"),
        "library_versions": obj.get("library_versions"),
    })
    return info


def _describe_export(path: Path) -> dict:
    from openllm.export import read_hf_dir

    cfg, state = read_hf_dir(path)
    meta = cfg.get("openllm") or {}
    return {"path": str(path), "format": "Hugging Face GPT-2 directory" + (" (openllm export)" if meta else ""),
            "size_bytes": _dir_size(path), "parameters": _params(state), "optimizer_state": False,
            "scheduler_state": False, "step": meta.get("step"), "training_log_entries": 0, "validation_log_entries": 0,
            "best_step": (meta.get("training_stats") or {}).get("best_step"),
            "best_validation_loss": meta.get("best_validation_loss"), "config": {k: cfg.get(k) for k in (
                "vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "activation_function")},
            "provenance": (meta.get("provenance") or {}).get("source", "unknown") if meta else "Hugging Face",
            "files": sorted(p.name for p in path.iterdir())}


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


def format_description(info: dict) -> str:
    size = info["size_bytes"] / 1e6
    lines = [f"{info['path']}", f"  format:            {info['format']}", f"  size on disk:      {size:,.1f} MB",
             f"  parameters:        {_fmt(info.get('parameters'))}", f"  step:              {_fmt(info.get('step'))}",
             f"  optimizer state:   {_fmt(info.get('optimizer_state'))}" + (f" ({info['optimizer_note']})" if info.get("optimizer_note") else ""),
             f"  scheduler state:   {_fmt(info.get('scheduler_state'))}",
             f"  training log:      {_fmt(info.get('training_log_entries'))} entries (last step {_fmt(info.get('training_log_last_step'))})",
             f"  validation log:    {_fmt(info.get('validation_log_entries'))} entries (last step {_fmt(info.get('validation_log_last_step'))})",
             f"  best checkpoint:   step {_fmt(info.get('best_step'))}, validation loss {_fmt(info.get('best_validation_loss'))}",
             f"  provenance:        {info.get('provenance')}"]
    if info.get("mask_buffers"):
        lines.append(f"  mask buffers:      {info['mask_buffers']} (legacy causal masks, dropped on conversion)")
    if info.get("stop_reason"):
        lines.append(f"  stop reason:       {info['stop_reason']}")
    if info.get("config"):
        lines.append(f"  model config:      {json.dumps(info['config'])}")
    if info.get("step_checkpoints"):
        lines.append(f"  step checkpoints:  {info['step_checkpoints']}")
    return "\n".join(lines)


COMPARE_ROWS = [("format", "format"), ("size (MB)", "size_bytes"), ("parameters", "parameters"), ("step", "step"),
                ("optimizer state", "optimizer_state"), ("scheduler state", "scheduler_state"),
                ("training log entries", "training_log_entries"), ("validation log entries", "validation_log_entries"),
                ("best step", "best_step"), ("best validation loss", "best_validation_loss"),
                ("provenance", "provenance")]


def format_comparison(infos: list[dict]) -> str:
    header = ["", *[Path(i["path"]).name or i["path"] for i in infos]]
    rows = [header]
    for label, key in COMPARE_ROWS:
        rows.append([label, *[f"{i[key] / 1e6:,.1f}" if key == "size_bytes" else _fmt(i.get(key)) for i in infos]])
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def verify_path(path: str | os.PathLike) -> list[ck.Verification]:
    """Verify a checkpoint file, or every checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"not found: {path}")
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files:
        raise OpenLLMError(f"{path} holds no .pt checkpoint")
    return [ck.verify_checkpoint(f) for f in files]
