"""Models: the configuration and preset registry, the architectures, and scoring text with a model.
Imports only :mod:`openllm.core` and :mod:`openllm.data`."""

from __future__ import annotations

from openllm.model.base import LanguageModel
from openllm.model.config import ModelConfig


def model_class(arch: str) -> type[LanguageModel]:
    """The class of a registered architecture (an OpenLLMError naming the choices for an unknown one)."""
    from openllm.model.registry import architecture

    return architecture(arch).model


def build_model(config: ModelConfig) -> LanguageModel:
    """The model of ``config.arch`` (randomly initialised)."""
    return model_class(config.arch)(config)


__all__ = ["LanguageModel", "ModelConfig", "build_model", "model_class"]
