"""The learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""

from __future__ import annotations

import math

from openllm.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr`` at ``lr_decay_steps``
    (default ``max_steps``); constant ``min_lr`` after that."""
    lr, min_lr, warmup = float(cfg.learning_rate), float(cfg.min_lr), int(cfg.warmup_steps)  # type: ignore[arg-type]
    if warmup and step <= warmup:
        return lr * step / warmup
    horizon = int(cfg.lr_decay_steps or cfg.max_steps)  # type: ignore[arg-type]
    if step >= horizon:
        return min_lr
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def scheduler_state(step: int, cfg: TrainConfig) -> dict:
    """The checkpoint's ``scheduler_state_dict``: the schedule's parameters and where it stands."""
    return {
        "name": "warmup_cosine",
        "last_step": step,
        "last_lr": lr_at(max(step, 1), cfg),
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.max_steps,
        "decay_steps": cfg.lr_decay_steps or cfg.max_steps,
        "max_lr": cfg.learning_rate,
        "min_lr": cfg.min_lr,
    }
