"""Hugging Face model directories, whatever the family: the adapter is looked up in the architecture
registry (:mod:`openllm.interop.families`) by our config's ``arch`` on the way out and by ``model_type``
on the way in, and our model is built from such a directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import SpecialTokens
from openllm.interop import families
from openllm.interop.gpt2 import read_hf_dir
from openllm.model import LanguageModel, build_model
from openllm.model.config import ModelConfig


def model_types() -> tuple[str, ...]:
    """Every Hugging Face ``model_type`` we convert."""
    return tuple(families.hf_model_types())


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return families.family(config.arch).to_hf(state, config)


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    return families.family(config.arch).config_to_hf(config, special, extra)


def import_hf_weights(cfg: dict, state: dict[str, torch.Tensor], origin: str) -> tuple[ModelConfig, dict]:
    """Our config and state dict for a Hugging Face config.json and its weights."""
    model_type = cfg.get("model_type")
    fam = families.family_of_model_type(model_type)
    if fam is None:
        raise OpenLLMError(
            f"{origin}: unsupported model_type {model_type!r} (expected one of {', '.join(model_types())})"
        )
    config = fam.config_from_hf(cfg, origin)
    return config, fam.from_hf(state, config)


def load_hf_model(path: str | os.PathLike) -> tuple[LanguageModel, dict]:
    """Our model (eval mode, CPU, no dropout) from a Hugging Face directory, and its config.json."""
    path = Path(path)
    cfg, state = read_hf_dir(path)
    config, state = import_hf_weights(cfg, state, str(path))
    config = config.replace(dropout=0.0)
    problems = ck.shape_problems(state, config.to_dict())
    if problems:
        raise OpenLLMError(f"{path}: {problems[0]}")
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval(), cfg
