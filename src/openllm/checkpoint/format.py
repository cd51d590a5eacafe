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

A run on a dataset mixture adds ``data_mixture`` (:data:`MIXTURE_KEY`): the datasets with their weights and
the tokens each supplied.

A LoRA checkpoint (:mod:`openllm.model.lora`) adds :data:`LORA_KEYS`: ``lora_config`` (the adapters'
:class:`~openllm.model.lora.LoRAConfig`) and ``lora_base`` (``path``: the checkpoint file or Hugging Face
directory of the frozen base weights, ``sha256``: their :func:`~openllm.model.lora.base_sha256`). Its
``model_state_dict`` holds the adapter tensors (and whole any base tensor trained along, such as an embedding
grown for new tokens: ``lora.lora_state_dict``), its ``optimizer_state_dict`` the optimizer over them; the
base is loaded from ``lora_base`` and must still hash the same (:func:`check_lora_base`).

This module is the only one that knows the keys: :func:`build_checkpoint` assembles a checkpoint
(training and ``openllm convert`` both use it), :func:`restore_run_state` reads progress back for a
resume, and :func:`read_info` gives every other reader (resume, inspect, plot, export, loading) a typed
:class:`CheckpointView`. ``tests/test_architecture.py`` fails on a checkpoint key read anywhere else.
Every command reads files through :func:`load_checkpoint`, which refuses a checkpoint whose format version
is unknown or whose checksum does not match (:class:`DamagedCheckpoint`); :func:`verify_checkpoint` adds
the key and shape checks.

``model_state_dict`` keeps the legacy key names including ``lm_head.weight``; it shares storage
with ``transformer.wte.weight``, and ``torch.save`` stores shared storage once.

Files are written with :func:`openllm.core.fileio.atomic_open` (temporary name, fsync, rename), so a
crash at any moment leaves either the previous file or the new one, never a torn file.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import platform
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openllm import __version__
from openllm.checkpoint.state import RunState
from openllm.core import faults, untrusted
from openllm.core.errors import OpenLLMError, first_line
from openllm.core.fileio import atomic_open, commit_directory, staging_dir, write_failure
from openllm.core.numbers import finite_or_none
from openllm.model.config import ModelConfig
from openllm.model.lora import LoRAConfig, adapter_shapes

FORMAT_VERSION = 2  # 1 was the legacy OpenLLM checkpoint, which had no version key
LEGACY_KEYS = (
    "model_state_dict",
    "step",
    "epoch",
    "best_loss",
    "best_validation_loss",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "training_log",
    "validation_log",
    "config",
    "training_config",
    "model_info",
    "training_stats",
)
REQUIRED_KEYS = LEGACY_KEYS + (
    "format_version",
    "checksum",
    "resume_state",
    "tokenizer_sha256",
    "dataset_fingerprint",
    "library_versions",
    "provenance",
)
# What ``resume_state`` holds (see resume_record); imported weights have none of it.
RESUME_KEYS = ("samples_seen", "global_token_offset", "world_size", "rng", "grad_scaler", "run_state")
# What a LoRA checkpoint holds besides (both or neither; see lora_record), and what its ``lora_base`` holds.
LORA_KEYS = ("lora_config", "lora_base")
# A run on several datasets (``train --data A --data B``): each dataset (name, path, fingerprint, weight) and the
# tokens each supplied up to the checkpoint's step
MIXTURE_KEY = "data_mixture"
LORA_BASE_KEYS = ("path", "sha256")


def library_versions() -> dict[str, str]:
    import sentencepiece

    return {
        "openllm": __version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "sentencepiece": str(sentencepiece.__version__),
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------ checksum


def _feed(h: hashlib._Hash, obj: Any) -> None:
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

    np_state: Any = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch_cpu"])
    if state.get("torch_cuda") and torch.cuda.is_available() and len(state["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# ------------------------------------------------------------------------------ build / read


def resume_record(*, samples_seen: int, tokens_per_sample: int, world_size: int, grad_scaler: dict) -> dict:
    """What exact resume needs beyond the :class:`RunState` (:func:`build_checkpoint`'s ``resume``): the data
    position (also as a global token offset, which holds for any number of processes), the number of
    processes, the RNG states as they are now, and the float16 GradScaler's state ({} without one)."""
    return {
        "samples_seen": samples_seen,
        "global_token_offset": samples_seen * tokens_per_sample,
        "world_size": world_size,
        "rng": capture_rng_state(),
        "grad_scaler": grad_scaler,
    }


def build_checkpoint(
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: RunState,
    model_config: ModelConfig,
    training_config: dict,
    model_info: dict,
    scheduler: dict,
    training_stats: dict,
    epoch: int,
    tokenizer_sha256: str | None,
    dataset_fingerprint: str | None,
    provenance: dict,
    resume: dict | None = None,
    lora: dict | None = None,
    mixture: dict | None = None,
) -> dict:
    """A complete checkpoint dict. ``resume`` holds what exact resume needs beyond ``state``
    (:func:`resume_record`); None for imported weights, which have no such state. ``lora`` (:func:`lora_record`)
    makes it a LoRA checkpoint: ``model_state`` is then ``lora.lora_state_dict(model)`` (the adapters, and any
    base tensor trained along) and ``optimizer_state`` that of the optimizer over them. ``mixture``
    (``DatasetMixture.record``) is a mixture run's :data:`MIXTURE_KEY`."""
    resume_state: dict = {}
    if resume is not None:
        run_state = {k: v for k, v in state.__dict__.items() if k not in RunState.STORED_ELSEWHERE}
        resume_state = {**resume, "run_state": run_state}
    # a trained run records inf until its first evaluation; imported weights record None when unmeasured
    best: float | None = state.best_validation_loss
    if resume is None and not math.isfinite(state.best_validation_loss):
        best = None
    return {
        "model_state_dict": model_state,
        "step": state.step,
        "epoch": epoch,
        "best_loss": best,  # the legacy name of the same figure
        "best_validation_loss": best,
        "optimizer_state_dict": optimizer_state,
        "scheduler_state_dict": scheduler,
        "training_log": state.training_log,
        "validation_log": state.validation_log,
        "config": model_config.to_dict(),
        "training_config": training_config,
        "model_info": model_info,
        "training_stats": training_stats,
        "resume_state": resume_state,
        "tokenizer_sha256": tokenizer_sha256,
        "dataset_fingerprint": dataset_fingerprint,
        "library_versions": library_versions(),
        "provenance": provenance,
        **(lora or {}),
        **({MIXTURE_KEY: mixture} if mixture else {}),
    }


def lora_record(config: LoRAConfig, base_path: str | os.PathLike, base_sha256: str) -> dict:
    """:func:`build_checkpoint`'s ``lora``: the adapters' config and where their frozen base is (``base_path``:
    the base checkpoint file, not a run directory, whose best model may change; or a Hugging Face directory),
    with :func:`~openllm.model.lora.base_sha256` of the base model as loaded."""
    return {
        "lora_config": config.to_dict(),
        "lora_base": {"path": str(Path(base_path).resolve()), "sha256": base_sha256},
    }


@dataclass(frozen=True)
class LoRAParts:
    """A LoRA checkpoint's own parts, checked (see :attr:`CheckpointView.lora`)."""

    config: LoRAConfig
    base_path: Path
    base_sha256: str
    tensors: dict[str, torch.Tensor]  # the adapters, and whole any base tensor trained along

    def base_missing(self, origin: str) -> OpenLLMError:
        """The refusal of a LoRA checkpoint ``origin`` whose base is not where it was."""
        return OpenLLMError(
            f"cannot use {origin}: its LoRA base {self.base_path} ({self.base_sha256}) is missing; the checkpoint "
            "holds only the adapters, which need the weights they were trained on: put the base back at that path"
        )


def check_lora_base(view: CheckpointView, base_sha256: str, origin: str) -> None:
    """Refuse (one error naming both hashes) a base model whose hash is not the one the adapters were trained
    on: they fit those weights only. ``base_sha256``: :func:`~openllm.model.lora.base_sha256` of the base as
    loaded; ``origin``: the LoRA checkpoint, for the message."""
    parts = view.lora
    if parts is None:
        raise OpenLLMError(f"{origin} is not a LoRA checkpoint")
    if base_sha256 != parts.base_sha256:
        raise OpenLLMError(
            f"cannot use {origin}: its LoRA base {parts.base_path} has changed since the adapters were trained "
            f"(recorded {parts.base_sha256}, found {base_sha256}); the adapters fit only the weights they were "
            "trained on: restore that base, or train the adapters again on this one"
        )


def restore_run_state(ckpt: dict, samples_per_step: int) -> RunState:
    """The :class:`RunState` a checkpoint was saved with (imported weights: step, logs and best loss only)."""
    resume = ckpt.get("resume_state") or {}
    saved = resume.get("run_state") or {}
    st = RunState(
        **{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__ and k not in RunState.STORED_ELSEWHERE}
    )
    st.step = int(ckpt["step"])
    st.samples_seen = int(resume.get("samples_seen", st.step * samples_per_step))
    st.training_log = list(ckpt.get("training_log") or [])
    st.validation_log = list(ckpt.get("validation_log") or [])
    best = finite_or_none(ckpt.get("best_validation_loss"))
    st.best_validation_loss = float(best) if best is not None else math.inf
    if st.best_step is None and best is not None:  # imported weights record where their loss was measured
        stats = ckpt.get("training_stats")
        st.best_step = stats.get("best_step") if isinstance(stats, dict) else None
    return st


TRAINED_HERE = "trained with openllm"


def provenance_origin(ckpt: dict) -> dict | None:
    """What the weights of ``ckpt`` were before OpenLLM trained them, for a run resumed from it: None when
    OpenLLM trained them from the start (a legacy checkpoint, which records nothing, was also trained
    here); else the provenance of their conversion, with the step OpenLLM's training began at. Kept
    through every later resume, so the chain is never lost."""
    provenance = read_info(ckpt).provenance
    if isinstance(provenance.get("origin"), dict):
        return provenance["origin"]
    if provenance.get("source") in (None, TRAINED_HERE):
        return None
    step = ckpt.get("step")
    return {**provenance, "trained_from_step": step if isinstance(step, int) else 0}


def training_provenance(origin: dict | None, step: int) -> dict:
    """The provenance of a checkpoint that training writes at ``step`` (``origin``: :func:`provenance_origin`
    of the checkpoint the run resumed from)."""
    if origin is None:
        return {"source": TRAINED_HERE, "optimizer_state": "trained"}
    start = int(origin.get("trained_from_step") or 0)
    return {
        "source": f"{origin.get('source')}, then trained {step - start:,} steps with openllm (to step {step:,})",
        "optimizer_state": "trained",
        "origin": origin,
    }


def has_optimizer_state(state: dict) -> bool:
    """Whether an ``optimizer_state_dict`` holds moments: one optimizer's (``state``), or each part's of a
    combined one (Muon + AdamW: ``{"muon": ..., "adamw": ...}``)."""
    if not isinstance(state, dict):
        return False
    if "state" in state:
        return bool(state["state"])
    parts = list(state.values())
    if not parts or not all(isinstance(part, dict) for part in parts):
        return False
    # a part over no parameters holds nothing (LoRA under Muon: every adapter is a block matrix, AdamW gets none)
    empty = [not any(g.get("params") for g in part.get("param_groups") or [] if isinstance(g, dict)) for part in parts]
    return any(part.get("state") for part in parts) and all(
        part.get("state") or none for part, none in zip(parts, empty, strict=True)
    )


@dataclass(frozen=True, eq=False)  # (eq would compare the tensors)
class CheckpointView:
    """A checkpoint read through typed properties: the only way code outside this module reads one (a test
    refuses a checkpoint key anywhere else). Tolerant by design: a value that is missing or of the wrong
    type reads as None or empty, because damaged and foreign files are inspected through it too."""

    data: dict = field(repr=False)

    def _mapping(self, key: str) -> dict:
        value = self.data.get(key)
        return value if isinstance(value, dict) else {}

    def _listing(self, key: str) -> list:  # log records only: a damaged file (structure_problems) may hold anything
        value = self.data.get(key)
        return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []

    def _integer(self, key: str) -> int | None:
        value = self.data.get(key)
        return value if isinstance(value, int) else None

    # ---- what the checkpoint says about itself
    @property
    def format_version(self) -> Any:
        return self.data.get("format_version")

    @property
    def checksum(self) -> str | None:
        return self.data.get("checksum")

    @property
    def library_versions(self) -> dict | None:
        return self.data.get("library_versions")

    @property
    def step(self) -> int | None:
        return self._integer("step")

    @property
    def epoch(self) -> int | None:
        return self._integer("epoch")

    @property
    def model_config(self) -> dict | None:
        """The model's config dict (:meth:`ModelConfig.to_dict`); None when the file has none."""
        config = self.data.get("config")
        return config if isinstance(config, dict) else None

    @property
    def training_config(self) -> dict:
        return self._mapping("training_config")

    @property
    def training_stats(self) -> dict:
        return self._mapping("training_stats")

    @property
    def model_info(self) -> dict:
        return self._mapping("model_info")

    @property
    def provenance(self) -> dict:
        return self._mapping("provenance")

    @property
    def best_validation_loss(self) -> float | None:
        return finite_or_none(self.data.get("best_validation_loss"))

    @property
    def training_log(self) -> list:
        return self._listing("training_log")

    @property
    def validation_log(self) -> list:
        return self._listing("validation_log")

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.data.get("tokenizer_sha256")

    @property
    def dataset_fingerprint(self) -> str | None:
        return self.data.get("dataset_fingerprint")

    @property
    def data_mixture(self) -> dict | None:
        """A mixture run's datasets, weights and tokens seen per dataset (None for one dataset)."""
        value = self.data.get(MIXTURE_KEY)
        return value if isinstance(value, dict) else None

    @property
    def best_step(self) -> int | None:
        return self.training_stats.get("best_step")

    @property
    def stop_reason(self) -> str | None:
        return self.training_stats.get("stop_reason")

    @property
    def source(self) -> str:
        return self.provenance.get("source", "unknown (legacy checkpoint)")

    @property
    def optimizer_note(self) -> str | None:
        return self.provenance.get("optimizer_state")

    # ---- the tensors
    @property
    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The weights under their legacy names; None when the file holds none. A LoRA checkpoint's are its
        adapters only (:attr:`lora`)."""
        state = self.data.get("model_state_dict")
        return state if isinstance(state, dict) else None

    @property
    def optimizer_state(self) -> dict:
        return self._mapping("optimizer_state_dict")

    @property
    def has_optimizer_state(self) -> bool:
        return has_optimizer_state(self.optimizer_state)

    @property
    def scheduler_state(self) -> dict:
        """What :func:`openllm.training.schedule.scheduler_state` recorded ({} for imported weights)."""
        return self._mapping("scheduler_state_dict")

    @property
    def has_scheduler_state(self) -> bool:
        return bool(self.data.get("scheduler_state_dict"))

    # ---- a LoRA checkpoint (see lora_record)
    @property
    def is_lora(self) -> bool:
        return any(k in self.data for k in LORA_KEYS)

    @property
    def lora(self) -> LoRAParts | None:
        """The LoRA config, base and adapters of a LoRA checkpoint (None for any other); a LoRA checkpoint whose
        parts are unusable is one error saying why (a verified one never is)."""
        if not self.is_lora:
            return None
        problems = lora_problems(self.data)
        if problems:
            raise OpenLLMError(f"a damaged LoRA checkpoint: {problems[0]}")
        base = self.data["lora_base"]
        return LoRAParts(
            LoRAConfig.from_dict(self.data["lora_config"]), Path(base["path"]), base["sha256"], self.model_state or {}
        )

    def without_tensors(self) -> dict:
        """The checkpoint minus its weights and optimizer moments: what a loaded model keeps as its metadata."""
        return {k: v for k, v in self.data.items() if k not in ("model_state_dict", "optimizer_state_dict")}

    # ---- what exact resume needs (see build_checkpoint); empty for imported weights
    @property
    def resume_state(self) -> dict:
        return self._mapping("resume_state")

    @property
    def world_size(self) -> int | None:
        """How many processes wrote the checkpoint; None when it does not say (imported weights)."""
        return self.resume_state.get("world_size")

    @property
    def run_state(self) -> dict:
        """The :class:`RunState` fields kept under ``resume_state`` (see :func:`restore_run_state`)."""
        saved = self.resume_state.get("run_state")
        return saved if isinstance(saved, dict) else {}

    @property
    def rng_state(self) -> dict | None:
        """The RNG states to give :func:`restore_rng_state`; None when none were recorded."""
        return self.resume_state.get("rng")

    @property
    def grad_scaler_state(self) -> dict:
        """The float16 GradScaler's state ({} when the run used none)."""
        return self.resume_state.get("grad_scaler") or {}


CheckpointInfo = CheckpointView  # the name readers used before the view held the tensors too


def read_info(ckpt: dict) -> CheckpointView:
    """The typed view of a checkpoint dict (loaded, or being built)."""
    return CheckpointView(ckpt)


# ---------------------------------------------------------------------------------- save / load


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> str:
    """Stamp format version and checksum onto ``ckpt`` and write it atomically; returns the checksum."""
    ckpt["format_version"] = FORMAT_VERSION
    ckpt["checksum"] = compute_checksum(ckpt)
    with atomic_open(path) as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (ENOSPC, EIO) as RuntimeError
            raise OpenLLMError(_write_failure(exc, Path(path))) from None
        f.flush()
        faults.reached("save")  # tests: die with a complete temporary file not yet renamed
    return ckpt["checksum"]


def _write_failure(exc: BaseException, path: Path) -> str:
    return write_failure(exc, path) or f"could not write {path} (the write failed); the previous files are intact"


class DamagedCheckpoint(OpenLLMError):
    """A file that reads as a checkpoint but fails :func:`integrity_problems`. ``checkpoint`` holds what was
    read: only ``openllm verify`` and ``openllm inspect`` catch this, to report the file rather than use it."""

    def __init__(self, path: Path, problems: list[str], checkpoint: dict):
        super().__init__(f"cannot use {path}: {'; '.join(problems)}")
        self.path, self.problems, self.checkpoint = path, problems, checkpoint


def structure_problems(ckpt: dict) -> list[str]:
    """What makes a checkpoint's plain values unusable (empty: nothing): nesting past the bounded reader's depth
    (checksums, inspect and the JSON records all walk them), or logs that are not lists of records."""
    try:
        untrusted.check_value(ckpt, text=False)  # text is not checked: paths may hold any bytes
    except untrusted.BadDocument as exc:
        return [f"its structure is {exc}"]
    for key in ("training_log", "validation_log"):
        log = ckpt.get(key)
        if log is not None and not (isinstance(log, list) and all(isinstance(e, dict) for e in log)):
            return [f"its {key} is not a list of log records"]
    return []


def integrity_problems(ckpt: dict) -> list[str]:
    """Why an OpenLLM checkpoint cannot be trusted (empty: it can): a format version this OpenLLM does not
    know, or contents that no longer match the checksum written with them. Files without a format version
    (legacy OpenLLM checkpoints, nanoGPT's, raw state dicts) carry neither, so there is nothing to check."""
    if "format_version" not in ckpt:
        return []
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        return [
            f"unknown checkpoint format version {version!r} (this OpenLLM reads up to {FORMAT_VERSION}); "
            "it was written by a newer OpenLLM or is damaged"
        ]
    if not isinstance(ckpt.get("checksum"), str):
        return ["it has no checksum, which every checkpoint of this format carries: it was altered after saving"]
    try:
        if ckpt["checksum"] != compute_checksum(ckpt):
            return ["checksum mismatch: the file's contents changed after it was written"]
    except RecursionError:
        return ["its structure is nested too deeply to be a checkpoint"]
    return []


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a checkpoint file safely (``weights_only``) and check its integrity (format version, checksum):
    the one way every command reads a checkpoint. Any failure is one clear error; a file that reads but is
    damaged raises :class:`DamagedCheckpoint`. A sharded checkpoint directory (:func:`save_sharded_checkpoint`)
    is read whole, as the file one process would have written.

    The checksum costs one sha256 pass over the tensors (about 1.5 GB/s on one core), small beside reading
    the file."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _load_sharded(path)
    if not path.is_file():
        raise OpenLLMError(f"checkpoint not found: {path}")
    obj = _read_file(path, map_location, mmap)
    problems = structure_problems(obj) or integrity_problems(obj)
    if problems:
        raise DamagedCheckpoint(path, problems, obj)
    return obj


def _read_file(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in random bytes; we say it in one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if wanted:
            raise OpenLLMError(
                f"refused to load {path}: it contains pickled Python objects or code, which are never "
                f"executed (it asks for {wanted.group(1)})"
            ) from None
        raise OpenLLMError(
            f"{path} is truncated, corrupt or not a checkpoint (it is not a readable tensor file)"
        ) from None
    except RecursionError:
        raise OpenLLMError(f"{path} is not a checkpoint: its structure is nested too deeply") from None
    except Exception:  # noqa: BLE001 - any failure to decode an untrusted file means it is corrupt
        raise OpenLLMError(
            f"{path} is truncated, corrupt or not a checkpoint (it is not a readable tensor file)"
        ) from None
    if not isinstance(obj, dict):
        raise OpenLLMError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    return obj


# -------------------------------------------------------------------------------- sharded checkpoints
#
# Under --fsdp every process holds a shard of each parameter and of its optimizer state. A step checkpoint is
# then a directory that every process writes its own shards into, in parallel, with torch.distributed.checkpoint
# (DCP): its ``.metadata`` and ``__R_N.distcp`` files, and SHARDED_META, written last by rank 0: the checkpoint
# dict with every sharded tensor (DTensor) left out, and under SHARDED_KEY where each one goes back and the
# sha256 of every file. Its checksum covers those hashes, so it vouches for the whole directory. The directory
# is built under a temporary name and renamed once complete (core.fileio.commit_directory): it appears whole
# or not at all. Read back (load_checkpoint), it is the dict one process would have written, whatever the
# number of processes: every reader of checkpoint files reads it, and a resume reshards it for its own.

SHARDED_META = "openllm.pt"
SHARDED_KEY = "sharded_tensors"  # in SHARDED_META: {"tensors": [key path, ...], "files": {name: sha256}, "world_size"}


_SHARD_FILE = re.compile(r"^(__\d+_\d+\.distcp|\.metadata)$")  # (the names DCP's file system writer gives)
_SHARDED_PARTS = ("model_state_dict", "optimizer_state_dict")  # where a sharded tensor may go back


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (it holds SHARDED_META)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


def _sharded_leaves(obj: Any, at: tuple = ()) -> list[tuple[tuple, Any]]:
    """(key path, tensor) of every DTensor in ``obj``'s nested dicts, in order."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return [(at, obj)]
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _sharded_leaves(v, (*at, k))]
    return []


def _without_sharded(obj: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict):
        return {k: _without_sharded(v) for k, v in obj.items() if not isinstance(v, DTensor)}
    return obj


def _dcp_key(at: tuple) -> str:
    return "/".join(str(k) for k in at)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def sharded_staging(path: str | os.PathLike) -> Path:
    """The temporary directory every process writes a sharded checkpoint into (rank 0 makes it; all agree)."""
    import torch.distributed as dist

    made = [staging_dir(path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(made, src=0)
    return Path(str(made[0]))


def split_sharded(ckpt: dict) -> tuple[dict, dict[str, Any], list[list]]:
    """``ckpt`` as a sharded checkpoint holds it: the dict without its DTensors (a copy, which later changes to
    the run do not reach), the DTensors by their DCP key, and their key paths in the dict."""
    leaves = _sharded_leaves(ckpt)
    meta = copy.deepcopy(_without_sharded(ckpt))
    return meta, {_dcp_key(at): t for at, t in leaves}, [list(at) for at, _ in leaves]


def write_shards(tensors: dict[str, Any], staging: Path, process_group: Any = None, *, background: bool = False) -> Any:
    """Every process: write its shards of ``tensors`` into ``staging`` with DCP. In the background
    (``dcp.async_save``, which first copies the shards aside, so that training may go on changing them) the
    returned future completes once the shards are written; :func:`finish_sharded_checkpoint` then follows."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(staging, sync_files=True)
    if background:
        return dcp.async_save(tensors, storage_writer=writer, process_group=process_group)
    dcp.save(tensors, storage_writer=writer, process_group=process_group)
    return None


def finish_sharded_checkpoint(
    meta: dict, paths: list[list], staging: Path, path: str | os.PathLike, process_group: Any = None
) -> None:
    """Every process, once the shards are written: hash its own files (in parallel); rank 0 then writes
    SHARDED_META (its checksum over the hashes) and renames the directory into place."""
    import torch.distributed as dist

    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    own = {p.name: _file_sha256(p) for p in sorted(staging.glob(f"__{rank}_*.distcp"))}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, own, group=process_group)
    failure: list[str | None] = [None]
    if rank == 0:
        try:
            files = {name: digest for part in every for name, digest in part.items()}
            files[".metadata"] = _file_sha256(staging / ".metadata")
            meta[SHARDED_KEY] = {"tensors": paths, "files": files, "world_size": world}
            save_checkpoint(meta, staging / SHARDED_META)
            commit_directory(staging, path)
        except (OSError, OpenLLMError) as exc:  # said to every process, which all stop with it
            failure[0] = str(exc) if isinstance(exc, OpenLLMError) else _write_failure(exc, Path(path))
    dist.broadcast_object_list(failure, src=0, group=process_group)
    if failure[0] is not None:
        raise OpenLLMError(failure[0])


def save_sharded_checkpoint(
    ckpt: dict, path: str | os.PathLike, process_group: Any = None, *, background: bool = False
) -> Callable[[], None] | None:
    """Every process: write ``ckpt`` (the same dict on each, its DTensors their own shards) as the sharded
    checkpoint directory ``path``, which appears only once it is complete. With ``background`` the shards are
    copied aside and being written when this returns, and the function returned completes the checkpoint
    (waits for the shards, hashes them, writes SHARDED_META, renames): run it in a thread, on every process
    (``process_group``: a group of its own, whose collectives do not mix with training's)."""
    meta, tensors, paths = split_sharded(ckpt)
    staging = sharded_staging(path)

    from torch.distributed.checkpoint.api import CheckpointException

    def failed(exc: BaseException) -> OpenLLMError:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OpenLLMError):
            return exc
        if isinstance(exc, CheckpointException):  # DCP's: every process's failure (exception, traceback)
            exc = next((e[0] for e in exc.failures.values() if isinstance(e, tuple)), exc)
        message = _write_failure(exc, Path(path)) if isinstance(exc, OSError) else None
        why = first_line(exc)
        return OpenLLMError(message or f"could not write {path}: {why}; the previous checkpoints are intact")

    def finish(written: Any = None) -> None:
        try:
            if written is not None:
                written.result()
            faults.reached("save")  # tests: die with every shard written, the directory not yet in place
            finish_sharded_checkpoint(meta, paths, staging, path, process_group)
        except (OSError, OpenLLMError, CheckpointException) as exc:
            raise failed(exc) from None

    try:
        written = write_shards(tensors, staging, process_group, background=background)
    except (OSError, CheckpointException) as exc:
        raise failed(exc) from None
    if background:
        return lambda: finish(written)
    finish()
    return None


def _load_sharded(path: Path) -> dict:
    """A sharded checkpoint directory read whole (in this process alone), after checking every file's hash."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _read_file(path / SHARDED_META)
    problems = structure_problems(meta) or integrity_problems(meta)
    info = meta.get(SHARDED_KEY)
    files = info.get("files") if isinstance(info, dict) else None
    tensors = info.get("tensors") if isinstance(info, dict) else None
    if not problems and not (
        isinstance(files, dict)
        and all(isinstance(n, str) and _SHARD_FILE.match(n) for n in files)
        and isinstance(tensors, list)
        and all(isinstance(at, list) and at and at[0] in _SHARDED_PARTS for at in tensors)
    ):
        problems = [f"its {SHARDED_META} does not list its shards"]
    if not problems and isinstance(files, dict):
        for name, digest in sorted(files.items()):
            if not (path / name).is_file():
                problems.append(f"shard {name} is missing")
            elif _file_sha256(path / name) != digest:
                problems.append(f"shard {name} is damaged (its sha256 differs from the one recorded)")
    if problems or not isinstance(tensors, list):
        raise DamagedCheckpoint(path, problems, meta)
    try:
        reader = FileSystemReader(path)
        stored = reader.read_metadata().state_dict_metadata
        loaded = {
            key: torch.empty(m.size, dtype=m.properties.dtype)
            for key, m in stored.items()
            if isinstance(m, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # (DCP warns that it reads in this one process, as meant)
            warnings.simplefilter("ignore")
            dcp.load(loaded, storage_reader=reader, no_dist=True)
        for at in tensors:
            node = meta
            for k in at[:-1]:
                node = node.setdefault(k, {})
            node[at[-1]] = loaded[_dcp_key(tuple(at))]
    except Exception as exc:  # noqa: BLE001 - the files hashed as written: this is an unreadable directory
        raise OpenLLMError(f"cannot read the sharded checkpoint {path}: {str(exc).splitlines()[0]}") from None
    del meta[SHARDED_KEY]
    return meta


# -------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    step: int | None = None
    kind: str = "unknown"  # "openllm", "legacy", "state_dict"
    checkpoint: dict | None = field(default=None, repr=False)  # with keep=True, the checkpoint when it verified


def verify_checkpoint(path: str | os.PathLike, *, keep: bool = False) -> Verification:
    """Check a checkpoint: it loads safely, its format version is known, its checksum matches, it has every
    key, and its shapes fit its config. ``keep``: also return the checkpoint read (when it verified), so a
    caller that goes on to use it reads and hashes the file once."""
    path = Path(path)
    v = Verification(path, ok=False)
    try:
        ckpt, damage = load_checkpoint(path), []
    except DamagedCheckpoint as exc:
        ckpt, damage = exc.checkpoint, exc.problems
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
    missing = [k for k in keys if k not in ckpt and k != "checksum"]  # (a missing checksum is damage)
    if missing:
        v.problems.append(f"missing keys: {', '.join(missing)}")
    v.problems.extend(damage)
    if damage and damage[0].startswith("unknown checkpoint format version"):
        return v  # a newer format: its shapes and keys mean something this OpenLLM does not know
    is_lora, lora_damage = any(k in ckpt for k in LORA_KEYS), lora_problems(ckpt)
    v.problems.extend(lora_damage)
    lora = LoRAConfig.from_dict(ckpt["lora_config"]) if is_lora and not lora_damage else None
    if lora is not None and not Path(ckpt["lora_base"]["path"]).exists():
        v.problems.append(f"its LoRA base {ckpt['lora_base']['path']} is missing (the file holds only the adapters)")
    usable = lora is not None or not is_lora  # (the shapes of adapters of an unreadable config mean nothing)
    usable = usable and not (damage and SHARDED_KEY in ckpt)  # (a damaged sharded one was not read past its meta)
    if usable and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("model_state_dict"), dict):
        v.problems.extend(shape_problems(ckpt["model_state_dict"], ckpt["config"], lora))
    v.ok = not v.problems
    if v.ok and keep:
        v.checkpoint = ckpt
    return v


def load_verified(path: str | os.PathLike, purpose: str) -> dict:
    """The checkpoint at ``path`` if it verifies completely (:func:`verify_checkpoint`), else one error
    saying what it cannot be used for (``purpose``: "export", "resume from") and why."""
    v = verify_checkpoint(path, keep=True)
    if v.checkpoint is None:
        raise OpenLLMError(f"cannot {purpose} {path}: {'; '.join(v.problems)}")
    return v.checkpoint


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model a config dict describes, with its shape (the model is built on the
    meta device, so this costs no memory and the architecture is declared only in its module)."""
    from openllm.model import build_model

    with torch.device("meta"), _NoRandomFill():
        model = build_model(ModelConfig.from_dict(config))
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


class _NoRandomFill(torch.overrides.TorchFunctionMode):
    """Skips the random initialisation of a model built on the meta device: there is nothing to fill, and
    the meta kernels of ``normal_`` import ``torch._dynamo`` on first use (2 s of every checkpoint load)."""

    FILLS = (torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.Tensor.normal_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def lora_problems(ckpt: dict) -> list[str]:
    """What makes a LoRA checkpoint's own keys unusable (empty: nothing, or not a LoRA checkpoint)."""
    if not any(k in ckpt for k in LORA_KEYS):
        return []
    missing = [k for k in LORA_KEYS if k not in ckpt]
    if missing:
        return [f"a LoRA checkpoint without {missing[0]}"]
    try:
        LoRAConfig.from_dict(ckpt["lora_config"])
    except (OpenLLMError, TypeError) as exc:
        return [f"its lora_config is invalid ({exc})"]
    base = ckpt["lora_base"]
    if not (isinstance(base, dict) and all(isinstance(base.get(k), str) and base.get(k) for k in LORA_BASE_KEYS)):
        return ["its lora_base does not name the base model's path and sha256"]
    return []


def shape_problems(state: dict, config: dict, lora: LoRAConfig | None = None) -> list[str]:
    """What keeps ``state`` from being the weights of a model with ``config`` (empty: they fit); with
    ``lora``, from being a LoRA checkpoint's state for it (every adapter, and maybe some base tensors).

    The config's sizes are checked against the tensors actually present before anything is built from
    them, so an absurd config (a billion layers, an enormous vocabulary) is one problem, not a memory bomb.
    """
    try:
        from openllm.model import model_class

        arch = model_class(config.get("arch", "gpt2"))
        embedding, blocks = arch.EMBEDDING, arch.BLOCKS
        wte = state.get(embedding)
        n_layer = int(config["n_layer"])
        layers_present = {k[len(blocks) :].split(".")[0] for k in state if k.startswith(blocks)}
        if n_layer > len(layers_present) + 1:
            return [
                f"model_state_dict lacks the tensors of {n_layer - len(layers_present):,} of the config's "
                f"{n_layer:,} layers (it holds {len(layers_present)})"
            ]
        if isinstance(wte, torch.Tensor) and tuple(wte.shape) != (int(config["vocab_size"]), int(config["n_embd"])):
            return [
                f"{embedding} has shape {tuple(wte.shape)}, the config needs "
                f"{(int(config['vocab_size']), int(config['n_embd']))}"
            ]
        want = required = expected_shapes(config)
        if lora is not None:  # every adapter, and whole any base tensor trained along (model.lora.lora_state_dict)
            required = adapter_shapes(want, config.get("arch", "gpt2"), n_layer, blocks, lora)
            want = {**want, **required}
    except (KeyError, TypeError, ValueError, OpenLLMError) as exc:
        return [f"config is incomplete or invalid ({exc})"]
    problems = []
    missing = [k for k in required if k not in state]
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
