"""The learning-rate schedules: linear warmup, then cosine decay (``cosine``) or a constant phase followed by
a linear cooldown (``wsd``, warmup-stable-decay), both ending at ``min_lr``.

What extending a run does: the schedule's horizon is ``--lr-decay-steps`` (default ``--max-steps``), so
raising ``--max-steps`` on resume stretches it. A cosine run then continues from a higher point of the
longer curve (its learning rate goes back up); a ``wsd`` run still in its stable phase continues at the same
learning rate and simply cools down later. Either way the trainer prints the change when a resume makes it;
``--lr-decay-steps`` pins the horizon.
"""

from __future__ import annotations

import math

from openllm.training.config import ScheduleOptions


def lr_at(step: int, cfg: ScheduleOptions) -> float:
    """The learning rate of optimizer step ``step`` (1-based)."""
    lr, min_lr, warmup = float(cfg.learning_rate), float(cfg.min_lr), int(cfg.warmup_steps)
    if warmup and step <= warmup:
        return lr * step / warmup
    horizon = int(cfg.lr_decay_steps or cfg.max_steps)
    if step >= horizon:
        return min_lr
    if (cfg.lr_schedule or "cosine") == "wsd":
        cooldown = max(1, round(float(cfg.cooldown_fraction or 0.0) * (horizon - warmup)))
        start = horizon - cooldown
        if step <= start:
            return lr
        return lr + (min_lr - lr) * (step - start) / cooldown
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def describe_schedule(cfg: ScheduleOptions) -> str:
    horizon = cfg.lr_decay_steps or cfg.max_steps
    shape = (
        f"constant, then a linear cooldown over the last {cfg.cooldown_fraction:.0%} of the steps"
        if cfg.lr_schedule == "wsd"
        else "cosine"
    )
    return f"warmup {cfg.warmup_steps}, {shape}, reaching {cfg.min_lr:g} at step {horizon}"


def scheduler_state(step: int, cfg: ScheduleOptions) -> dict:
    """The checkpoint's ``scheduler_state_dict``: the schedule's parameters and where it stands."""
    return {
        "name": "warmup_stable_decay" if cfg.lr_schedule == "wsd" else "warmup_cosine",
        "schedule": cfg.lr_schedule,
        "last_step": step,
        "last_lr": lr_at(max(step, 1), cfg),
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.max_steps,
        "decay_steps": cfg.lr_decay_steps or cfg.max_steps,
        "cooldown_fraction": cfg.cooldown_fraction,
        "max_lr": cfg.learning_rate,
        "min_lr": cfg.min_lr,
    }
