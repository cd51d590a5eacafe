"""The GPT-2 model in the legacy OpenLLM (nanoGPT) layout.

Learned absolute positions, pre-LayerNorm blocks, a fused query/key/value projection, an
exact-GELU MLP of 4x width, a final LayerNorm and an output head tied to the token embedding.
Attention goes through ``scaled_dot_product_attention`` (flash/memory-efficient kernels where the
device has them), so there is no mask buffer in the state dict.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from openllm.model.base import LanguageModel
from openllm.model.config import ModelConfig
from openllm.model.kv_cache import KVCache, attend
from openllm.model.registry import Architecture, LoRATarget, register

M = TypeVar("M", bound=nn.Module)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, positions) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = attend(q, k, v, dropout=self.dropout if self.training else 0.0)
        else:
            y = cache.attend(layer, q, k, v, positions)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"  # "none": exact (erf) GELU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, positions, rope=None) -> torch.Tensor:
        # rope: rotary tables, which GPT-2 has none of (its learned positions are added to the input)
        x = x + self.attn(self.ln_1(x), cache, layer, positions)
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    ARCHITECTURE = "GPT-2 (pre-LayerNorm, learned positions, tied head)"
    BLOCKS = "transformer.h."
    EMBEDDING = "transformer.wte.weight"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self._part("wte", nn.Embedding).weight  # tied: one tensor, stored once
        self.init_weights(residual="c_proj.weight")

    def _part(self, name: str, kind: type[M]) -> M:
        """A submodule of ``transformer``, typed (a ModuleDict's members are only ``Module`` to a type checker)."""
        module = self.transformer[name]
        assert isinstance(module, kind)
        return module

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self._part("h", nn.ModuleList)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self._part("wte", nn.Embedding)(idx) + self._part("wpe", nn.Embedding)(positions)
        return self._part("drop", nn.Dropout)(x)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._part("ln_f", nn.LayerNorm)(x)

    def position_parameters(self) -> int:
        return self._part("wpe", nn.Embedding).weight.numel()


# LoRA targets: q, k and v are the three thirds of the fused c_attn (each adapted on its own rows, so a
# target means the same matrix as in Llama); GPT-2 has no gate, its MLP is up (c_fc) and down (c_proj)
LORA_TARGETS = {
    "q": LoRATarget("attn.c_attn", 0, 3),
    "k": LoRATarget("attn.c_attn", 1, 3),
    "v": LoRATarget("attn.c_attn", 2, 3),
    "o": LoRATarget("attn.c_proj"),
    "up": LoRATarget("mlp.c_fc"),
    "down": LoRATarget("mlp.c_proj"),
}

register(
    Architecture(
        name="gpt2", model=GPT, fields=("activation",), bias=True, bias_optional=True, lora_targets=LORA_TARGETS
    )
)
