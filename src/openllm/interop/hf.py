"""Hugging Face model directories, whatever the family: picks the adapter (:mod:`openllm.interop.gpt2`
or :mod:`openllm.interop.llama`) by our config's ``arch`` on the way out and by ``model_type`` on the
way in, and builds our model from such a directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import SpecialTokens
from openllm.interop import gpt2, llama
from openllm.model import LanguageModel, build_model
from openllm.model.config import ModelConfig

MODEL_TYPES = ("gpt2", *llama.MODEL_TYPES)


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return llama.to_hf(state, config) if config.arch == "llama" else gpt2.to_hf(state, config)


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    return (llama.config_to_hf if config.arch == "llama" else gpt2.config_to_hf)(config, special, extra)


def import_hf_weights(cfg: dict, state: dict[str, torch.Tensor], origin: str) -> tuple[ModelConfig, dict]:
    """Our config and state dict for a Hugging Face config.json and its weights."""
    model_type = cfg.get("model_type")
    if model_type in llama.MODEL_TYPES:
        config = llama.config_from_hf(cfg, origin)
        return config, llama.from_hf(state, config)
    if model_type != "gpt2":
        raise OpenLLMError(
            f"{origin}: unsupported model_type {model_type!r} (expected one of {', '.join(MODEL_TYPES)})"
        )
    config = gpt2.config_from_hf(cfg, origin)
    state = gpt2.from_hf(state)
    if not config.bias:  # our export of a bias-free model writes zero biases: drop them again
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    return config, state


def load_hf_model(path: str | os.PathLike) -> tuple[LanguageModel, dict]:
    """Our model (eval mode, CPU, no dropout) from a Hugging Face directory, and its config.json."""
    path = Path(path)
    cfg, state = gpt2.read_hf_dir(path)
    config, state = import_hf_weights(cfg, state, str(path))
    config = config.replace(dropout=0.0)
    problems = ck.shape_problems(state, config.to_dict())
    if problems:
        raise OpenLLMError(f"{path}: {problems[0]}")
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval(), cfg
