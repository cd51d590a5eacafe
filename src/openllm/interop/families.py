"""The architecture registry (interop layer): each architecture's way in and out of the ecosystem.

Every architecture of :mod:`openllm.model.registry` has one :class:`Family` here, registered by its
adapter module (``interop/gpt2.py``, ``interop/llama.py``, ``interop/qwen2.py``): the Hugging Face
``model_type``s it reads and writes, its state-dict and config translations both ways, the keys
``inspect`` shows of a Hugging Face config, and its GGUF layout, or the reason llama.cpp cannot take it.
:mod:`openllm.interop.hf`, :mod:`openllm.interop.gguf_file`, ``convert``, ``export`` and ``inspect``
look everything up here; none of them tests an architecture's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import SpecialTokens
from openllm.model.config import ModelConfig
from openllm.model.registry import names as architecture_names

# The adapter modules, each registering the family of one architecture when imported.
MODULES = ("openllm.interop.gpt2", "openllm.interop.llama", "openllm.interop.qwen2")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp holds an architecture: its architecture name for a config, the metadata beyond the
    common keys, and every tensor under llama.cpp's name in the layout its kernels expect."""

    arch: Callable[[ModelConfig], str]  # llama.cpp's architecture name for this config
    gguf_archs: tuple[str, ...]  # every name ``arch`` can give (reading a file back)
    metadata: Callable[[Any, ModelConfig], None]  # (GGUFWriter, config): the architecture's own keys
    tensors: Callable[[State, ModelConfig], Iterator[tuple[str, torch.Tensor]]]  # (gguf name, float32 tensor)
    expected: Callable[[str, int], list[str]]  # (gguf arch, layers): the tensor names a whole file holds


@dataclass(frozen=True)
class Family:
    arch: str  # the ModelConfig ``arch`` (model registry)
    hf_model_types: dict[str, str]  # Hugging Face model_type -> its class (architectures[0]), read and written
    hf_names: dict[str, str]  # model_type -> the family's name as people write it ("Qwen3")
    to_hf: Callable[[State, ModelConfig], State]
    from_hf: Callable[[State, ModelConfig], State]
    config_to_hf: Callable[[ModelConfig, SpecialTokens, dict | None], dict]
    config_from_hf: Callable[[dict, str], ModelConfig]
    hf_config_keys: tuple[str, ...]  # what ``inspect`` shows of such a config.json
    gguf: GGUFLayout | None = None
    gguf_refusal: str = field(default="")  # why there is no GGUF layout (gguf None)


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    if family.arch in _FAMILIES:
        raise ValueError(f"family {family.arch} registered twice")
    _FAMILIES[family.arch] = family
    return family


def _all() -> dict[str, Family]:
    global _loaded
    if not _loaded:
        for module in MODULES:
            importlib.import_module(module)
        missing = [a for a in architecture_names() if a not in _FAMILIES]
        if missing:  # a model file registered without its adapter: a programming error, named
            raise RuntimeError(f"architecture {missing[0]} has no interop family (add it to {__name__}.MODULES)")
        _loaded = True
    return _FAMILIES


def family(arch: str) -> Family:
    """The family of an architecture (model registry name)."""
    families = _all()
    if arch not in families:
        raise OpenLLMError(f"arch must be one of {', '.join(families)}, got {arch!r}")
    return families[arch]


def hf_model_types() -> dict[str, Family]:
    """Every Hugging Face model_type we read, with the family that reads it."""
    return {t: f for f in _all().values() for t in f.hf_model_types}


def family_of_model_type(model_type: Any) -> Family | None:
    return hf_model_types().get(model_type) if isinstance(model_type, str) else None


def gguf_layout_of(gguf_arch: Any) -> GGUFLayout | None:
    """The layout that writes llama.cpp architecture ``gguf_arch`` (None: not one we write)."""
    for f in _all().values():
        if f.gguf is not None and gguf_arch in f.gguf.gguf_archs:
            return f.gguf
    return None
