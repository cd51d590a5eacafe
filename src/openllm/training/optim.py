"""The optimizer and the seeding of every random generator a run uses."""

from __future__ import annotations

import random

import numpy as np
import torch

from openllm.model.gpt import GPT
from openllm.training.config import TrainConfig


def configure_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorms); fused on CUDA."""
    params = dict(model.named_parameters())
    decay, no_decay = ([params[n] for n in names] for names in model.optimizer_groups())
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, **extra)  # type: ignore[arg-type]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
