"""``RunState``: a training run's progress, the part of a checkpoint that exact resume restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry for exact resume."""

    step: int = 0
    samples_seen: int = 0
    best_validation_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    stop_reason: str | None = None
    skipped_steps: int = 0
    consecutive_bad: int = 0
    lowest_training_loss: float = math.inf
    elapsed_seconds: float = 0.0
    tokens_seen: int = 0
    resumed_from: list[str] = field(default_factory=list)
    training_log: list[dict] = field(default_factory=list)
    validation_log: list[dict] = field(default_factory=list)

    # Fields a checkpoint stores under keys of their own (legacy keys), not inside resume_state.run_state.
    STORED_ELSEWHERE = ("step", "best_validation_loss", "training_log", "validation_log")

    def stats(self, *, epochs: float | None, world_size: int, device: str) -> dict:
        """The checkpoint's ``training_stats``: what the run did, for people and model cards."""
        return {
            "total_steps": self.step,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "epochs": epochs,
            "elapsed_seconds": self.elapsed_seconds,
            "average_tokens_per_second": self.tokens_seen / self.elapsed_seconds if self.elapsed_seconds else None,
            "skipped_steps": self.skipped_steps,
            "best_step": self.best_step,
            "best_validation_loss": self.best_validation_loss,
            "last_validation_loss": self.validation_log[-1]["validation_loss"] if self.validation_log else None,
            "lowest_training_loss": self.lowest_training_loss,
            "last_training_loss": self.training_log[-1]["loss"] if self.training_log else None,
            "stop_reason": self.stop_reason,
            "resumed_from": list(self.resumed_from),
            "world_size": world_size,
            "device": device,
        }
