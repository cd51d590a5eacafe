"""Load a model for use (generation, evaluation, serving) from whatever the user points at:
a checkpoint file, a run directory, or an exported Hugging Face directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import resolve_checkpoint_path
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import Tokenizer, load_tokenizer
from openllm.interop import merged
from openllm.interop.gpt2 import is_export_dir
from openllm.interop.hf import load_hf_model
from openllm.model import LanguageModel


@dataclass
class LoadedModel:
    model: LanguageModel
    tokenizer: Tokenizer
    source: Path
    checkpoint: dict | None = None  # the checkpoint's metadata (no tensors), when loaded from one

    @property
    def dataset_fingerprint(self) -> str | None:
        return self.info.dataset_fingerprint

    @property
    def info(self) -> ck.CheckpointView:
        return ck.read_info(self.checkpoint or {})


def model_from_checkpoint(ckpt: dict, origin: str) -> LanguageModel:
    """The model a checkpoint holds, LoRA adapters merged (:func:`openllm.interop.merged.model_from_checkpoint`)."""
    return merged.model_from_checkpoint(ckpt, origin)


def _checked_tokenizer(directory: Path, model: LanguageModel, model_config: dict | None = None) -> Tokenizer:
    """The tokenizer beside the model, which must have exactly the embedding's number of tokens."""
    tokenizer = load_tokenizer(directory, model_config)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise OpenLLMError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}"
        )
    return tokenizer


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    if is_export_dir(path):
        model, cfg = load_hf_model(path)
        meta = cfg.get("openllm") or {}
        return LoadedModel(
            model.to(device),
            _checked_tokenizer(path, model, cfg),
            path,
            {"dataset_fingerprint": meta.get("dataset_fingerprint"), "step": meta.get("step")},
        )
    file = resolve_checkpoint_path(path)
    ckpt = ck.load_checkpoint(file)
    model = model_from_checkpoint(ckpt, str(file)).to(device)
    tokenizer = _checked_tokenizer(file.parent, model)
    return LoadedModel(model, tokenizer, file, ck.read_info(ckpt).without_tensors())
