"""A plain model from an OpenLLM checkpoint: the one place a model is rebuilt from one, for every command that
uses weights (``generate``, ``eval``, ``serve`` through :mod:`openllm.inference.loading`; ``export``).

A LoRA checkpoint holds only its adapters (:mod:`openllm.checkpoint.format`, ``lora_base``): its base is
loaded from the path it records (a checkpoint file, a run directory or a Hugging Face directory; a LoRA
checkpoint in turn), refused by name when it is missing or no longer hashes the same, and the adapters are
applied and merged, so what comes out is an ordinary model with plain weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import resolve_checkpoint_path
from openllm.core.errors import OpenLLMError
from openllm.interop.gpt2 import is_export_dir
from openllm.interop.hf import load_hf_model
from openllm.model import LanguageModel, build_model
from openllm.model.config import ModelConfig
from openllm.model.lora import apply_lora, base_sha256, is_adapter_key, load_adapters, merge_lora

MAX_BASES = 8  # LoRA on LoRA on ...: a chain this long is surely a loop of files naming each other


def model_from_checkpoint(ckpt: dict, origin: str, _depth: int = 0) -> LanguageModel:
    """The model (CPU, eval mode, no dropout) a checkpoint dict holds, LoRA adapters merged into plain weights."""
    view = ck.read_info(ckpt)
    config, state = view.model_config, view.model_state
    if config is None or state is None:
        raise OpenLLMError(
            f"{origin} is not a full checkpoint (no config/model_state_dict); convert raw weights with "
            "`openllm convert`"
        )
    lora = view.lora
    problems = ck.shape_problems(state, config, lora.config if lora else None)
    if problems:
        raise OpenLLMError(f"{origin}: {problems[0]}")
    model = build_model(ModelConfig.from_dict(config, dropout=0.0))
    if lora is None:
        model.load_state_dict(state)
        return model.eval()
    base = _base_model(lora, origin, _depth)
    ck.check_lora_base(view, base_sha256(base), origin)
    # the base's weights, with those the LoRA run trained whole (a grown embedding) in their place
    weights = {**base.state_dict(), **{k: t for k, t in state.items() if not is_adapter_key(k)}}
    problems = ck.shape_problems(weights, config)
    if problems:
        raise OpenLLMError(
            f"cannot use {origin}: its LoRA base {lora.base_path} does not fit its model ({problems[0]})"
        )
    model.load_state_dict(weights)
    apply_lora(model, lora.config)
    load_adapters(model, {k: t for k, t in state.items() if is_adapter_key(k)})
    merge_lora(model)
    return model.eval()


def plain_model(path: str | os.PathLike, _depth: int = 0) -> LanguageModel:
    """The plain model (CPU, eval mode, no dropout) at ``path``: a checkpoint file, a run directory (its best
    model) or a Hugging Face directory; a LoRA checkpoint's adapters merged. What a LoRA run's base is loaded
    with: hash it with :func:`~openllm.model.lora.base_sha256` before changing anything."""
    path = Path(path)
    if is_export_dir(path):
        return load_hf_model(path)[0]
    file = resolve_checkpoint_path(path)
    return model_from_checkpoint(ck.load_verified(file, "load"), str(file), _depth)


def _base_model(lora: ck.LoRAParts, origin: str, depth: int) -> LanguageModel:
    if not lora.base_path.exists():
        raise lora.base_missing(origin)
    if depth >= MAX_BASES:
        raise OpenLLMError(f"cannot use {origin}: its chain of LoRA bases is longer than {MAX_BASES} (a loop?)")
    return plain_model(lora.base_path, depth + 1)


def plain_state(ckpt: dict, origin: str) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as plain ones (what ``export`` writes): its own, or its base's with its LoRA
    adapters merged in (the keys exactly those of the model without LoRA)."""
    view = ck.read_info(ckpt)
    if not view.is_lora:
        return view.model_state or {}
    return model_from_checkpoint(ckpt, origin).state_dict()
