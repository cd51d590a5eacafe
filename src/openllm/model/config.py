"""The model configuration and the preset registry.

Every preset lives in :data:`PRESETS`; ``small``/``medium``/``large`` are the legacy OpenLLM
shapes (vocab 32,000, arch ``gpt2``, AdamW, cosine schedule); ``tiny`` (arch ``llama``, Muon, a
warmup-stable-decay schedule) is sized to train well on two CPU cores in under a minute.

``arch`` picks the architecture from the registry (:mod:`openllm.model.registry`): ``gpt2`` (the legacy
layout), ``llama`` (rotary positions, RMSNorm, SwiGLU, no biases) or ``qwen2`` (the Llama block with
query/key/value biases). Each architecture honours some of the fields after ``arch`` and refuses any other
set to something it cannot honour; its own rules (biases, head sizes) are checked by its registration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from openllm.core.errors import OpenLLMError

if TYPE_CHECKING:
    from openllm.model.registry import Architecture

# Sanity bounds checked before any model is built from a config (an untrusted file may ask for anything).
LIMITS = {"vocab_size": 2**24, "n_layer": 1024, "n_head": 1024, "n_embd": 65536, "block_size": 2**20}


_REQUIRED = object()


class ImportedFields:
    """Typed reads of the fields of a config written elsewhere (a Hugging Face config.json, nanoGPT's
    model_args), where anything may stand. A missing field, a value of the wrong type (2.5 layers, "8" heads,
    true as a size) or out of range (0 heads) is one error naming the field, before any arithmetic on it (a
    ZeroDivisionError) or a conversion that would quietly change it (int(2.5) is 2)."""

    def __init__(self, cfg: dict, origin: str):
        self.cfg, self.origin = cfg, origin

    def _get(self, key: str, default: Any) -> Any:
        value = self.cfg.get(key, default) if default is not _REQUIRED else self.cfg.get(key, _REQUIRED)
        if value is _REQUIRED:
            raise OpenLLMError(f"{self.origin} lacks {key}")
        return value

    def _refuse(self, key: str, wanted: str, value: Any) -> OpenLLMError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return OpenLLMError(f"{self.origin}: {key} must be {wanted}, got {shown}")

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._refuse(key, f"a whole number of at least {minimum}", value)
        return value

    def number(self, key: str, default: Any = _REQUIRED, probability: bool = False) -> float:
        """A positive finite number (an epsilon, rope_theta), or with ``probability`` one in [0, 1) (dropout)."""
        value = self._get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (0 <= value < 1 if probability else value > 0):
            raise self._refuse(key, "a number in [0, 1)" if probability else "a finite number above 0", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._refuse(key, "true or false", value)
        return value

    def mapping(self, key: str) -> dict:
        value = self.cfg.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._refuse(key, "an object", value)
        return value


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
    arch: str = "gpt2"
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head)
    intermediate_size: int | None = None  # SwiGLU hidden width (None: 8/3 n_embd rounded up to 64)
    rope_theta: float = 10000.0
    qk_norm: bool = False  # RMSNorm over each query and key head before the rotation
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OpenLLMError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > limit:
                raise OpenLLMError(f"model config: {name} {value:,} is beyond what OpenLLM builds (at most {limit:,})")
        if self.n_embd % self.n_head:
            raise OpenLLMError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        self.architecture.validate(self)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise OpenLLMError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def architecture(self) -> Architecture:
        """This config's entry in the architecture registry (:mod:`openllm.model.registry`)."""
        from openllm.model.registry import architecture

        return architecture(self.arch)

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width, as the architecture defines it (gpt2: 4x; Llama-family: ``intermediate_size``
        or 8/3 n_embd rounded up to 64)."""
        return self.architecture.mlp_hidden(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        """The fields that shape this architecture, with the values the model really uses (``inspect``): a
        Llama block shows its SwiGLU width and key/value heads, not the GPT-2 activation it never runs."""
        from openllm.model.registry import OPTIONAL_FIELDS

        arch = self.architecture
        out = {k: v for k, v in self.to_dict().items() if k not in OPTIONAL_FIELDS or k in arch.fields}
        return {**out, **arch.described(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **changes: Any) -> ModelConfig:
        """A config from a checkpoint's or config.json's dict (unknown keys ignored), with ``changes`` applied."""
        if not isinstance(data, dict):
            raise OpenLLMError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, **changes})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    # Defaults a run of this size should start from; `openllm train` options override them.
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    max_steps: int
    eval_every: int
    save_every: int
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.1
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    # Autocast dtype on a CPU with native bf16 (AVX512-BF16 or AMX) when --dtype is not given; other CPUs
    # always train in float32. Every preset keeps float32: bf16 CPU kernels are faster but were measured to
    # give different weights in identical runs on a busy machine (docs/reliability.md), float32 never did.
    cpu_dtype: str = "float32"

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size


@functools.cache
def _presets() -> dict[str, Preset]:
    """The presets, built on first use: validating their configs loads the architecture registry, whose
    model files import this module."""
    return {
        # Tuned for quality per CPU-second on tiny Shakespeare (docs/benchmarks.md, "Sweep for the `tiny` preset"):
        # with ~0.7M training tokens in under a minute of CPU, a shallow Llama block trained with Muon, a short
        # warmup and a warmup-stable-decay schedule learns the most per second.
        "tiny": Preset(
            model=ModelConfig(
                vocab_size=1024, n_layer=2, n_head=4, n_embd=128, block_size=128, dropout=0.0, bias=False, arch="llama"
            ),
            batch_size=16,
            seq_len=128,
            learning_rate=6e-3,
            warmup_steps=10,
            max_steps=350,
            eval_every=175,
            save_every=175,
            weight_decay=0.1,
            optimizer="muon",
            lr_schedule="wsd",
        ),
        "small": Preset(
            model=ModelConfig(vocab_size=32000, n_layer=6, n_head=8, n_embd=512, block_size=1024, dropout=0.1),
            batch_size=8,
            seq_len=512,
            learning_rate=6e-4,
            warmup_steps=500,
            max_steps=10000,
            eval_every=500,
            save_every=500,
        ),
        "medium": Preset(
            model=ModelConfig(vocab_size=32000, n_layer=12, n_head=12, n_embd=768, block_size=2048, dropout=0.1),
            batch_size=8,
            seq_len=1024,
            learning_rate=3e-4,
            warmup_steps=1000,
            max_steps=20000,
            eval_every=1000,
            save_every=1000,
            gradient_accumulation_steps=4,
        ),
        "large": Preset(
            model=ModelConfig(vocab_size=32000, n_layer=24, n_head=16, n_embd=1024, block_size=2048, dropout=0.1),
            batch_size=4,
            seq_len=1024,
            learning_rate=2e-4,
            warmup_steps=2000,
            max_steps=50000,
            eval_every=1000,
            save_every=1000,
            gradient_accumulation_steps=8,
        ),
    }


def __getattr__(name: str) -> Any:  # PRESETS is built on first use (see _presets)
    if name == "PRESETS":
        return _presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_preset(name: str) -> Preset:
    try:
        return _presets()[name]
    except (KeyError, TypeError):
        raise OpenLLMError(f"unknown model size {name!r}; choose one of: {', '.join(_presets())}") from None


def model_config_for(
    name: str, vocab_size: int | None = None, arch: str | None = None, **overrides: Any
) -> ModelConfig:
    """The preset's model config with the vocabulary size, the architecture and any other field replaced.

    Another ``arch`` keeps the preset's shape (layers, heads, width, context, dropout) and takes that
    architecture's defaults for the rest: a ``gpt2`` preset as ``llama`` has no biases and a SwiGLU MLP."""
    config = get_preset(name).model
    if arch is not None and arch != config.arch:
        shape = {k: getattr(config, k) for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "dropout")}
        from openllm.model.registry import architecture

        config = ModelConfig(**shape, arch=arch, bias=architecture(arch).bias)
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    return config.replace(**{k: v for k, v in overrides.items() if v is not None})
