"""The checkpoint format, in one place.

A checkpoint is a ``torch.save``d dict of tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)``: no class is ever unpickled. It carries the legacy
OpenLLM keys (:data:`LEGACY_KEYS`) and what exact resume and verification need:

=======================  =====================================================================
``format_version``       :data:`FORMAT_VERSION`
``checksum``             sha256 over every other key, tensors by dtype, shape and bytes
``resume_state``         data position (global sample counter), RNG states (Python, NumPy, torch
                         CPU and CUDA), GradScaler, early-stopping state, world size
``tokenizer_sha256``     hash of the tokenizer.model the run used
``dataset_fingerprint``  hash of the packed token streams the run trained on
``library_versions``     openllm, torch, numpy, sentencepiece, python
``provenance``           how the weights came to be (trained here, converted from ...)
=======================  =====================================================================

``model_state_dict`` keeps the legacy key names including ``lm_head.weight``; it shares storage
with ``transformer.wte.weight``, and ``torch.save`` stores shared storage once.

Files are written with :func:`openllm.fileio.atomic_open` (temporary name, fsync, rename), so a
crash at any moment leaves either the previous file or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from openllm import __version__, faults
from openllm.errors import OpenLLMError
from openllm.fileio import atomic_open

FORMAT_VERSION = 2  # 1 was the legacy OpenLLM checkpoint, which had no version key
LEGACY_KEYS = (
    "model_state_dict", "step", "epoch", "best_loss", "best_validation_loss", "optimizer_state_dict",
    "scheduler_state_dict", "training_log", "validation_log", "config", "training_config", "model_info",
    "training_stats",
)
REQUIRED_KEYS = LEGACY_KEYS + ("format_version", "checksum", "resume_state", "tokenizer_sha256",
                               "dataset_fingerprint", "library_versions", "provenance")
BEST, FINAL = "best_model.pt", "final_model.pt"
_STEP_FILE = re.compile(r"^checkpoint_step_(\d+)\.pt$")


def step_file(step: int) -> str:
    return f"checkpoint_step_{step}.pt"


def library_versions() -> dict[str, str]:
    import sentencepiece

    return {"openllm": __version__, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "sentencepiece": str(sentencepiece.__version__), "python": platform.python_version()}


# ------------------------------------------------------------------------------------ checksum

def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def compute_checksum(ckpt: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------ RNG state

def capture_rng_state() -> dict:
    import random

    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ---------------------------------------------------------------------------------- save / load

def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> str:
    """Stamp format version and checksum onto ``ckpt`` and write it atomically; returns the checksum."""
    ckpt["format_version"] = FORMAT_VERSION
    ckpt["checksum"] = compute_checksum(ckpt)
    with atomic_open(path) as f:
        torch.save(ckpt, f)
        f.flush()
        faults.reached("save")  # tests: die with a complete temporary file not yet renamed
    return ckpt["checksum"]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a checkpoint file safely (``weights_only``); any failure is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise OpenLLMError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted:
            raise OpenLLMError(f"refused to load {path}: it contains pickled Python objects or code, which are never "
                               f"executed (it asks for {wanted.group(1)})") from None
        raise OpenLLMError(f"{path} is truncated, corrupt or not a checkpoint ({_first_line(exc)[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - any failure to decode an untrusted file means it is corrupt
        raise OpenLLMError(f"{path} is truncated, corrupt or not a checkpoint ({_first_line(exc)[:160]})") from None
    if not isinstance(obj, dict):
        raise OpenLLMError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    return obj


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -------------------------------------------------------------------------------------- verify

@dataclass
class Verification:
    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    step: int | None = None
    kind: str = "unknown"  # "openllm", "legacy", "state_dict"


def verify_checkpoint(path: str | os.PathLike, ckpt: dict | None = None) -> Verification:
    """Check a checkpoint: it loads safely, has every key, its checksum matches, shapes fit its config."""
    path = Path(path)
    v = Verification(path, ok=False)
    try:
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    except OpenLLMError as exc:
        v.problems.append(str(exc))
        return v
    v.step = ckpt.get("step") if isinstance(ckpt.get("step"), int) else None
    if "model_state_dict" not in ckpt and all(isinstance(t, torch.Tensor) for t in ckpt.values()):
        v.kind = "state_dict"
        v.problems.append("a bare state dict (raw weights): convert it with `openllm convert`")
        return v
    v.kind = "openllm" if "format_version" in ckpt else "legacy"
    keys = REQUIRED_KEYS if v.kind == "openllm" else LEGACY_KEYS
    missing = [k for k in keys if k not in ckpt]
    if missing:
        v.problems.append(f"missing keys: {', '.join(missing)}")
    if v.kind == "openllm" and "checksum" in ckpt and ckpt["checksum"] != compute_checksum(ckpt):
        v.problems.append("checksum mismatch: the file's contents changed after it was written")
    if isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model_state_dict"), dict):
        v.problems.extend(shape_problems(ckpt["model_state_dict"], ckpt["config"]))
    v.ok = not v.problems
    return v


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the GPT model for a config dict, with its shape."""
    V, L, C, T = (int(config[k]) for k in ("vocab_size", "n_layer", "n_embd", "block_size"))
    bias = bool(config.get("bias", True))
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C), "lm_head.weight": (V, C),
              "transformer.ln_f.weight": (C,)}
    if bias:
        shapes["transformer.ln_f.bias"] = (C,)
    for i in range(L):
        p = f"transformer.h.{i}."
        layer = {"ln_1.weight": (C,), "ln_2.weight": (C,), "attn.c_attn.weight": (3 * C, C),
                 "attn.c_proj.weight": (C, C), "mlp.c_fc.weight": (4 * C, C), "mlp.c_proj.weight": (C, 4 * C)}
        if bias:
            layer.update({"ln_1.bias": (C,), "ln_2.bias": (C,), "attn.c_attn.bias": (3 * C,),
                          "attn.c_proj.bias": (C,), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.bias": (C,)})
        shapes.update({p + k: s for k, s in layer.items()})
    return shapes


def shape_problems(state: dict, config: dict) -> list[str]:
    try:
        want = expected_shapes(config)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"config is incomplete or invalid ({exc})"]
    problems = []
    missing = [k for k in want if k not in state]
    if missing:
        problems.append(f"model_state_dict lacks {len(missing)} tensors (first: {missing[0]})")
    for k, shape in want.items():
        t = state.get(k)
        if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
            problems.append(f"{k} has shape {tuple(t.shape)}, the config needs {shape}")
    extra = [k for k in state if k not in want]
    if extra:
        problems.append(f"model_state_dict has {len(extra)} unexpected tensors (first: {extra[0]})")
    return problems


# ----------------------------------------------------------------------------------- run folder

def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``checkpoint_step_N.pt`` files of a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Files ``--resume auto`` may use, newest training state first."""
    run_dir = Path(run_dir)
    ranked: list[tuple[int, int, Path]] = [(step, 1, p) for step, p in step_checkpoints(run_dir)]
    for name, rank in ((FINAL, 2), (BEST, 0)):
        p = run_dir / name
        if p.is_file():
            try:
                step = int(load_checkpoint(p, mmap=True).get("step", -1))
            except (OpenLLMError, TypeError, ValueError):
                step = -1
            ranked.append((step, rank, p))
    return [p for _, _, p in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def find_resumable(run_dir: str | os.PathLike, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``run_dir`` that verifies; older ones are tried with a warning."""
    for path in resume_candidates(run_dir):
        try:
            ckpt = load_checkpoint(path)
        except OpenLLMError as exc:
            warn(f"warning: skipping {path.name}: {exc}")
            continue
        v = verify_checkpoint(path, ckpt)
        if v.ok:
            return path, ckpt
        warn(f"warning: skipping {path.name}: {'; '.join(v.problems)}")
    return None


def rotate(run_dir: str | os.PathLike, keep_last: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints, never one in ``protect``."""
    keep = {Path(p).resolve() for p in protect if p}
    files = step_checkpoints(run_dir)
    removed = []
    for _, p in files[: max(0, len(files) - keep_last)]:
        if p.resolve() not in keep:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
