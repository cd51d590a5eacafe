"""Load a model for use (generation, evaluation, serving) from whatever the user points at:
a checkpoint file, a run directory, or an exported Hugging Face directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from openllm import checkpoint as ck
from openllm.config import ModelConfig
from openllm.errors import OpenLLMError
from openllm.model import GPT
from openllm.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    source: Path
    checkpoint: dict | None = None  # the checkpoint's metadata (no tensors), when loaded from one

    @property
    def dataset_fingerprint(self) -> str | None:
        return (self.checkpoint or {}).get("dataset_fingerprint")


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory means its best_model.pt (else final_model.pt, else its newest step checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"model not found: {path}")
    if path.is_file():
        return path
    for name in (ck.BEST, ck.FINAL):
        if (path / name).is_file():
            return path / name
    steps = ck.step_checkpoints(path)
    if steps:
        return steps[-1][1]
    raise OpenLLMError(f"{path} holds no checkpoint (best_model.pt, final_model.pt or checkpoint_step_N.pt)")


def model_from_checkpoint(ckpt: dict, origin: str) -> GPT:
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model_state_dict"), dict):
        raise OpenLLMError(f"{origin} is not a full checkpoint (no config/model_state_dict); convert raw weights with "
                           "`openllm convert`")
    problems = ck.shape_problems(ckpt["model_state_dict"], ckpt["config"])
    if problems:
        raise OpenLLMError(f"{origin}: {problems[0]}")
    model = GPT(ModelConfig.from_dict({**ckpt["config"], "dropout": 0.0}))
    model.load_state_dict(ckpt["model_state_dict"])
    return model.eval()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / ck.BEST).is_file():
        from openllm.export import load_export  # an exported Hugging Face directory

        return load_export(path, device)
    file = resolve_checkpoint_path(path)
    ckpt = ck.load_checkpoint(file)
    model = model_from_checkpoint(ckpt, str(file)).to(device)
    tok_path = file.parent / "tokenizer.model"
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise OpenLLMError(f"{tok_path} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                           f"{model.config.vocab_size}")
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state_dict", "optimizer_state_dict")}
    return LoadedModel(model, tokenizer, file, meta)
