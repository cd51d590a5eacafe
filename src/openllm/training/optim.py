"""The optimizer and the seeding of every random generator a run uses."""

from __future__ import annotations

import random

import numpy as np
import torch

from openllm.model import LanguageModel
from openllm.training.config import TrainConfig

OPTIMIZERS = ("adamw", "muon")


def configure_optimizer(
    model: LanguageModel, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer | MuonAdamW:
    """``--optimizer adamw``: AdamW with weight decay on matrices only (not biases, LayerNorms); fused on CUDA.
    ``--optimizer muon``: PyTorch's Muon for the transformer blocks' weight matrices, AdamW for the rest."""
    params = dict(model.named_parameters())
    decay, no_decay = model.optimizer_groups()
    hidden = [n for n in decay if n.startswith(model.BLOCKS)] if cfg.optimizer == "muon" else []
    decay = [n for n in decay if n not in hidden]
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, **extra)  # type: ignore[arg-type]
    if not hidden:
        return adamw
    # "match_rms_adamw" scales Muon's orthogonalised update to AdamW's size, so one learning-rate schedule
    # drives both parts
    muon = torch.optim.Muon(
        [params[n] for n in hidden], lr=cfg.learning_rate, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: ``param_groups`` lists both parts' groups (the schedule sets
    their learning rate), and the state dict holds each part under its name."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts.values() for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(
                "the checkpoint's optimizer state is not a Muon + AdamW state (was it trained with adamw?)"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
