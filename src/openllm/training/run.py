"""A training run in memory (:class:`Run`), its outcome (:class:`TrainResult`) and how it can stop early."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openllm.checkpoint.state import RunState
from openllm.core.errors import OpenLLMError
from openllm.data.batches import BatchSampler, EvalBatches
from openllm.data.conversations import ConversationSet
from openllm.data.dataset import PreparedDataset
from openllm.data.mixture import DatasetMixture, MixtureEvalBatches, MixtureSampler
from openllm.data.tokenizer import Tokenizer
from openllm.model import LanguageModel
from openllm.model.config import ModelConfig
from openllm.training.chatdata import ConversationEvalBatches, ConversationSampler
from openllm.training.config import RunConfig
from openllm.training.distributed import DistInfo
from openllm.training.optim import MuonAdamW


class TrainingStopped(OpenLLMError):
    """The run stopped before its planned end (a signal, or a diverged loss); the message says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class StartingPoint:
    """The weights a fine-tune starts from (its ``--model``), loaded by the layer that can read every format
    (:mod:`openllm.finetune`): the model's config, its state dict, its tokenizer, and what it was."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str  # what it was, for people: "runs/base/best_model.pt (step 2000)"
    sha256: str  # of the base weights as loaded (model.lora.base_sha256)
    path: str  # the checkpoint file or Hugging Face directory it was loaded from (a LoRA run's lora_base)
    learning_rate: float | None = None  # the peak learning rate it was trained with, when its checkpoint says


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    dataset: PreparedDataset | ConversationSet | DatasetMixture
    model_config: ModelConfig
    raw_model: LanguageModel
    model: torch.nn.Module  # raw_model, possibly compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer | MuonAdamW
    scaler: torch.amp.GradScaler
    sampler: BatchSampler | ConversationSampler | MixtureSampler
    val_batches: EvalBatches | ConversationEvalBatches | MixtureEvalBatches
    device: torch.device
    autocast_dtype: torch.dtype
    dist: DistInfo
    state: RunState
    tokenizer: Tokenizer
    resumed_path: Path | None = None
    last_checkpoint: Path | None = None
    log: Callable[[str], None] = print
    peak_flops: float | None = None
    eval_seconds: float = 0.0  # wall and CPU time spent in validation passes (benchmarks report them apart)
    eval_cpu_seconds: float = 0.0
    validation_fingerprint: str = ""  # sha256 of the validation tokens (a resume on other text resets the best)
    origin: dict | None = None  # where resumed weights came from before OpenLLM trained them (converted ones)
    # the micro-batch fetched ahead (its first sample, inputs, targets), on the device: see loop.micro_batch
    next_batch: tuple[int, torch.Tensor, torch.Tensor, int] | None = None
    base: StartingPoint | None = None  # a fine-tune's base model (a LoRA run's checkpoints name it)
    pending_save: Any = None  # the step checkpoint being written in the background (checkpointing.BackgroundSave)
    checkpoint_group: Any = None  # --fsdp --async-save: the process group background saves communicate in

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer.sha256

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.dist.world_size


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_step: int | None
    best_validation_loss: float
    stop_reason: str | None
    final_checkpoint: Path | None
    config: RunConfig | None = None  # the run's resolved options (the closing sample reads its own)
