"""Model presets and the training configuration, as plain dataclasses.

Every preset lives in :data:`PRESETS`; ``small``/``medium``/``large`` are the legacy OpenLLM
shapes (vocab 32,000), ``tiny`` is sized to train well on two CPU cores in a couple of minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from openllm.errors import OpenLLMError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 1024
    dropout: float = 0.1
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OpenLLMError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise OpenLLMError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise OpenLLMError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    # Defaults a run of this size should start from; `openllm train` options override them.
    vocab_size: int
    batch_size: int
    seq_len: int
    learning_rate: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    eval_every: int
    save_every: int
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.1


PRESETS: dict[str, Preset] = {
    # Tuned for quality per CPU-second on tiny Shakespeare (see docs/benchmarks.md).
    "tiny": Preset(
        model=ModelConfig(vocab_size=1024, n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
        vocab_size=1024, batch_size=32, seq_len=128, learning_rate=2e-3, min_lr=2e-4,
        warmup_steps=50, max_steps=1200, eval_every=200, save_every=400, weight_decay=0.1,
    ),
    "small": Preset(
        model=ModelConfig(vocab_size=32000, n_layer=6, n_head=8, n_embd=512, block_size=1024, dropout=0.1),
        vocab_size=32000, batch_size=8, seq_len=512, learning_rate=6e-4, min_lr=6e-5,
        warmup_steps=500, max_steps=10000, eval_every=500, save_every=500,
    ),
    "medium": Preset(
        model=ModelConfig(vocab_size=32000, n_layer=12, n_head=12, n_embd=768, block_size=2048, dropout=0.1),
        vocab_size=32000, batch_size=8, seq_len=1024, learning_rate=3e-4, min_lr=3e-5,
        warmup_steps=1000, max_steps=20000, eval_every=1000, save_every=1000, gradient_accumulation_steps=4,
    ),
    "large": Preset(
        model=ModelConfig(vocab_size=32000, n_layer=24, n_head=16, n_embd=1024, block_size=2048, dropout=0.1),
        vocab_size=32000, batch_size=4, seq_len=1024, learning_rate=2e-4, min_lr=2e-5,
        warmup_steps=2000, max_steps=50000, eval_every=1000, save_every=1000, gradient_accumulation_steps=8,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise OpenLLMError(f"unknown model size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def model_config_for(name: str, vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """The preset's model config with the vocabulary size and any other field replaced."""
    config = get_preset(name).model
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    return config.replace(**{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TrainConfig:
    """Everything `openllm train` needs. Field names are the option names with '_' for '-'."""

    data: str | None = None
    data_file: str | None = None
    validation_data: str | None = None
    tokenizer_dir: str | None = None
    model_size: str = "tiny"
    vocab_size: int | None = None
    max_steps: int | None = None
    output_dir: str = "runs/openllm"
    save_every: int | None = None
    eval_every: int | None = None
    eval_batches: int = 50
    log_every: int = 10
    early_stopping_patience: int = 0
    early_stopping_min_delta: float = 0.0
    batch_size: int | None = None
    seq_len: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float = 1.0
    dropout: float | None = None
    seed: int = 1337
    device: str = "auto"
    dtype: str | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    keep_last: int = 3
    resume: str | None = None
    allow_data_change: bool = False
    reset_early_stopping: bool = False
    max_bad_steps: int = 5
    tensorboard: bool = False
    peak_flops: float | None = None
    sample_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """Fill unset fields from the preset and check every value; returns a new config."""
        preset = get_preset(self.model_size)
        out = dataclasses.replace(self)
        for name in ("max_steps", "save_every", "eval_every", "batch_size", "seq_len", "learning_rate",
                     "min_lr", "warmup_steps", "weight_decay", "gradient_accumulation_steps", "vocab_size"):
            if getattr(out, name) is None:
                setattr(out, name, getattr(preset, name))
        if out.dropout is None:
            out.dropout = preset.model.dropout
        out.validate()
        return out

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                kind = "a non-negative" if allow_zero else "a positive"
                raise OpenLLMError(f"--{name.replace('_', '-')} must be {kind} integer, got {value!r}")

        def finite(name: str, low: float = 0.0) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
                raise OpenLLMError(f"--{name.replace('_', '-')} must be a finite number >= {low:g}, got {value!r}")

        for name in ("max_steps", "save_every", "eval_every", "eval_batches", "log_every", "batch_size", "seq_len",
                     "gradient_accumulation_steps", "keep_last", "max_bad_steps", "vocab_size"):
            positive(name)
        for name in ("warmup_steps", "early_stopping_patience", "seed"):
            positive(name, allow_zero=True)
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "early_stopping_min_delta"):
            finite(name)
        if self.min_lr > self.learning_rate:
            raise OpenLLMError(f"--min-lr ({self.min_lr}) must not exceed --learning-rate ({self.learning_rate})")
        if not (0.0 <= self.dropout < 1.0):
            raise OpenLLMError(f"--dropout must be in [0, 1), got {self.dropout!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise OpenLLMError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise OpenLLMError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.data and self.data_file:
            raise OpenLLMError("give either --data (a prepared dataset) or --data-file (raw text), not both")
        if self.peak_flops is not None:
            finite("peak_flops")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


TRAIN_OPTION_NAMES = tuple(f.name for f in fields(TrainConfig) if f.name != "extra")
