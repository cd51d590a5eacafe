"""Fine-tuning (`openllm finetune`): a training run that starts from a model of any format OpenLLM reads and
learns from conversations. It composes the layers below it: the base model comes in through the inference
loader (run directories, checkpoints, Hugging Face directories converted on the fly, LoRA runs merged), and the
run itself is :func:`openllm.training.loop.train` with that starting point, so every guarantee of training
(best model, early stopping, exact resume, checkpoints, records, locks, signals) holds unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from openllm.core.errors import OpenLLMError
from openllm.inference.loading import load_model
from openllm.model.lora import base_sha256
from openllm.training.config import RunConfig, TrainConfig
from openllm.training.loop import train
from openllm.training.run import StartingPoint, TrainResult

__all__ = ["finetune", "load_base"]


def load_base(path: str) -> StartingPoint:
    """The model ``--model`` names, with its tokenizer, as the starting point of a fine-tune."""
    where = Path(path)
    if not where.exists():
        raise OpenLLMError(f"--model not found: {path}")
    loaded = load_model(where)
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    step = loaded.info.step
    source = f"{loaded.source}" + (f" (step {step})" if isinstance(step, int) else "")
    lr = loaded.info.training_config.get("learning_rate") if loaded.checkpoint else None
    return StartingPoint(
        loaded.model.config,
        state,
        loaded.tokenizer,
        source,
        base_sha256(state),
        str(loaded.source),
        float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else None,
    )


def finetune(cfg: TrainConfig | RunConfig, log: Callable[[str], None] = print) -> TrainResult | None:
    """Fine-tune ``cfg.base_model`` on ``cfg.chat_data`` (see ``openllm finetune --help``); None when a resumed
    run has nothing left to do."""
    return train(cfg, log, start=load_base)
