"""Qwen2: the Llama block (:mod:`openllm.model.llama`) with biases on the query, key and value projections,
the architecture of Hugging Face's ``Qwen2ForCausalLM`` (Qwen2 and Qwen2.5, e.g. Qwen2.5-0.5B).

Everything else (rotary positions, RMSNorm, SwiGLU, grouped-query attention, tied or untied head) is
Llama's, and the parameter names are Hugging Face's, so the state dict is theirs key for key.
"""

from __future__ import annotations

from openllm.model.llama import (
    LORA_TARGETS,
    ROTARY_FIELDS,
    Attention,
    Block,
    Llama,
    check_rotary_config,
    describe_rotary,
    swiglu_width,
)
from openllm.model.registry import Architecture, register


class Qwen2Attention(Attention):
    QKV_BIAS = True


class Qwen2Block(Block):
    ATTENTION = Qwen2Attention


class Qwen2(Llama):
    ARCHITECTURE = "Qwen2 (Llama block with query/key/value biases)"
    BLOCK = Qwen2Block


register(
    Architecture(
        name="qwen2",
        model=Qwen2,
        fields=ROTARY_FIELDS,
        bias=True,  # config.bias true: the query/key/value projections carry biases (no other layer does)
        mlp_hidden=swiglu_width,
        check=check_rotary_config,
        described=describe_rotary,
        lora_targets=LORA_TARGETS,
    )
)
