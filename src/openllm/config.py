"""Model presets and the training configuration, as plain dataclasses.

Every preset lives in :data:`PRESETS`; ``small``/``medium``/``large`` are the legacy OpenLLM
shapes (vocab 32,000), ``tiny`` is sized to train well on two CPU cores in a couple of minutes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
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
    activation: str = "gelu"  # exact GELU; "gelu_tanh" for imported Hugging Face GPT-2 weights

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OpenLLMError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise OpenLLMError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise OpenLLMError(f"model config: activation must be gelu or gelu_tanh, got {self.activation!r}")
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
    # Autocast dtype on a CPU with native bf16 (AVX512-BF16 or AMX) when --dtype is not given;
    # other CPUs always train in float32.
    cpu_dtype: str = "float32"


PRESETS: dict[str, Preset] = {
    # Tuned for quality per CPU-second on tiny Shakespeare (docs/benchmarks.md): with ~1M training tokens
    # in a minute of CPU, a shallow model that sees more text beats a deeper one that sees less.
    "tiny": Preset(
        model=ModelConfig(vocab_size=1024, n_layer=2, n_head=4, n_embd=128, block_size=128, dropout=0.0),
        vocab_size=1024, batch_size=16, seq_len=128, learning_rate=4e-3, min_lr=4e-4,
        warmup_steps=30, max_steps=850, eval_every=425, save_every=425, weight_decay=0.1, cpu_dtype="bfloat16",
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


# Built-in defaults for the options a preset does not set.
DEFAULTS: dict[str, Any] = {
    "model_size": "tiny", "output_dir": "runs/openllm", "eval_batches": 50, "log_every": 10,
    "early_stopping_patience": 0, "early_stopping_min_delta": 0.0, "grad_clip": 1.0, "seed": 1337,
    "device": "auto", "keep_last": 3, "max_bad_steps": 5, "compile": False, "activation_checkpointing": False,
    "allow_data_change": False, "reset_early_stopping": False, "tensorboard": False,
}
PRESET_FIELDS = ("max_steps", "save_every", "eval_every", "batch_size", "seq_len", "learning_rate", "min_lr",
                 "warmup_steps", "weight_decay", "gradient_accumulation_steps", "vocab_size")
# Options that describe this invocation only and are never inherited from a checkpoint on resume.
NOT_INHERITED = ("resume", "allow_data_change", "reset_early_stopping", "output_dir")


@dataclass
class TrainConfig:
    """Every `openllm train` option; field names are option names with '_' for '-'.

    ``None`` means "not given": :meth:`resolved` fills it from the checkpoint being resumed (if
    any), then the preset of ``model_size``, then :data:`DEFAULTS`.
    """

    data: str | None = None
    data_file: str | None = None
    validation_data: str | None = None
    tokenizer_dir: str | None = None
    model_size: str | None = None
    vocab_size: int | None = None
    max_steps: int | None = None
    output_dir: str | None = None
    save_every: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    log_every: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    lr_decay_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    dropout: float | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    compile: bool | None = None
    activation_checkpointing: bool | None = None
    keep_last: int | None = None
    resume: str | None = None
    allow_data_change: bool | None = None
    reset_early_stopping: bool | None = None
    max_bad_steps: int | None = None
    tensorboard: bool | None = None
    peak_flops: float | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def resolved(self, inherited: dict[str, Any] | None = None) -> "TrainConfig":
        """A complete, checked config: given values, then ``inherited``, then preset and defaults."""
        merged = {k: v for k, v in (inherited or {}).items() if k in TRAIN_OPTION_NAMES and k not in NOT_INHERITED}
        merged.update(self.given())
        out = TrainConfig(**merged)
        preset = get_preset(out.model_size or DEFAULTS["model_size"])
        for name in PRESET_FIELDS:
            if getattr(out, name) is None:
                setattr(out, name, getattr(preset, name))
        for name, value in DEFAULTS.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        if out.dropout is None:
            out.dropout = preset.model.dropout
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name: str, what: str, value: Any) -> OpenLLMError:
            return OpenLLMError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise bad(name, "a positive integer" if minimum else "a non-negative integer", value)

        def number(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise bad(name, "a finite number >= 0", value)

        for name in ("max_steps", "save_every", "eval_every", "eval_batches", "log_every", "batch_size", "seq_len",
                     "gradient_accumulation_steps", "keep_last", "max_bad_steps", "vocab_size"):
            integer(name, 1)
        for name in ("warmup_steps", "early_stopping_patience", "seed"):
            integer(name, 0)
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "early_stopping_min_delta"):
            number(name)
        if self.peak_flops is not None:
            number("peak_flops")
        if self.lr_decay_steps is not None:
            integer("lr_decay_steps", 1)
        if self.min_lr > self.learning_rate:
            raise OpenLLMError(f"--min-lr ({self.min_lr}) must not exceed --learning-rate ({self.learning_rate})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise bad("dropout", "a number in [0, 1)", self.dropout)
        for name in ("compile", "activation_checkpointing", "allow_data_change", "reset_early_stopping", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false", getattr(self, name))
        for name in ("data", "data_file", "validation_data", "tokenizer_dir", "output_dir", "resume"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "a path", getattr(self, name))
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "auto, cpu or cuda", self.device)
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise bad("dtype", "float32, bfloat16 or float16", self.dtype)
        if self.data and self.data_file:
            raise OpenLLMError("give either --data (a prepared dataset) or --data-file (raw text), not both")
        get_preset(self.model_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_OPTION_NAMES = tuple(f.name for f in fields(TrainConfig))
