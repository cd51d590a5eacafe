"""The architecture registry (model layer): what the rest of OpenLLM needs to know of an architecture.

An architecture is one model file (``gpt.py``, ``llama.py``, ``qwen2.py``) that ends with one
:func:`register` call. Its :class:`Architecture` names the model class (which carries the checkpoint
key layout: the embedding key, the blocks' prefix, the modules it is built of), the configuration
fields it honours (every other field must keep its neutral value, so nothing is accepted and ignored),
its biases, its MLP width and the blocks that activation checkpointing and sharding wrap.

What lies above the model layer (the Hugging Face adapter, the GGUF layout) is registered the same way
in :mod:`openllm.interop.families`, one entry per architecture.

Adding an architecture: write ``model/NAME.py`` with its model class and ``register(...)``, add the
module to :data:`MODULES`, then its adapter in ``interop`` (docs/architecture.md goes step by step).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openllm.core.errors import OpenLLMError

# (No import of the model modules here, not even for types: they import this one, and Config asks it
# for its architecture. ``Config`` stands for ModelConfig, ``Model`` for a LanguageModel subclass.)
Config = Any
Model = Any

# The model files, each registering one architecture (or more) when imported.
MODULES = ("openllm.model.gpt", "openllm.model.llama", "openllm.model.qwen2")

# ModelConfig fields that only some architectures honour, with the neutral value every other one must keep.
OPTIONAL_FIELDS: dict[str, Any] = {
    "activation": "gelu",
    "n_kv_head": None,
    "intermediate_size": None,
    "rope_theta": 10000.0,
    "qk_norm": False,
    "tie_embeddings": True,
    "norm_eps": 1e-5,
}


@dataclass(frozen=True)
class LoRATarget:
    """Where a LoRA target (an architecture-neutral name: ``q``, ``v``, ``up``...) lies in every block: the
    ``nn.Linear`` at ``module`` (a path inside the block), or the ``part``-th of its ``parts`` equal slices of
    output rows, for a fused projection (GPT-2's ``c_attn`` holds q, k and v one after the other)."""

    module: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class Architecture:
    name: str  # the config's ``arch``
    model: Model  # the LanguageModel subclass
    fields: tuple[str, ...]  # the OPTIONAL_FIELDS this architecture honours
    bias: bool  # whether its linear layers carry biases (``config.bias`` must say so; gpt2 allows either)
    bias_optional: bool = False
    mlp_hidden: Callable[[Config], int] = lambda c: 4 * c.n_embd
    check: Callable[[Config], None] = lambda c: None  # the architecture's own config rules
    described: Callable[[Config], dict[str, Any]] = lambda c: {}  # what ``inspect`` shows beyond the fields
    # the matrices LoRA may adapt, by target name (model/lora.py); none: ``--lora-rank`` is refused for it
    lora_targets: dict[str, LoRATarget] = field(default_factory=dict)

    @property
    def blocks_prefix(self) -> str:
        """The state-dict prefix of the transformer blocks (Muon takes their matrices)."""
        return self.model.BLOCKS

    @property
    def embedding_key(self) -> str:
        return self.model.EMBEDDING

    def blocks(self, model: Model) -> Any:
        """The blocks activation checkpointing and sharding wrap (an nn.ModuleList, one module per layer)."""
        return model.blocks

    def validate(self, config: Config) -> None:
        for name, neutral in OPTIONAL_FIELDS.items():
            value = getattr(config, name)
            if name not in self.fields and value != neutral and not (name == "n_kv_head" and value == config.n_head):
                wanted = " or ".join(a.name for a in _all().values() if name in a.fields)
                raise OpenLLMError(f"model config: {name} {value!r} needs arch {wanted}")
        if not self.bias_optional and config.bias != self.bias:
            has = "has q/k/v biases (bias must be true)" if self.bias else "has no biases (bias must be false)"
            raise OpenLLMError(f"model config: arch {self.name} {has}")
        self.check(config)


_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name} registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def _all() -> dict[str, Architecture]:
    """Every architecture, in the order of :data:`MODULES` (whichever model file was imported first)."""
    global _loaded
    if not _loaded:
        for module in MODULES:
            importlib.import_module(module)
        order = {a.name: (MODULES.index(a.model.__module__), i) for i, a in enumerate(_REGISTRY.values())}
        ordered = sorted(_REGISTRY.values(), key=lambda a: order[a.name])
        _REGISTRY.clear()
        _REGISTRY.update((a.name, a) for a in ordered)
        _loaded = True
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every architecture's name, in registration order: the ``--arch`` choices."""
    return tuple(_all())


def architecture(name: str) -> Architecture:
    archs = _all()
    if not isinstance(name, str) or name not in archs:
        raise OpenLLMError(f"model config: arch must be one of {', '.join(archs)}, got {name!r}")
    return archs[name]
