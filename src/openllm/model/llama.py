"""The Llama-style model: rotary positions, RMSNorm, a SwiGLU MLP and no biases.

Options (all in :class:`~openllm.model.config.ModelConfig`): the rotary base ``rope_theta``, the MLP
width ``intermediate_size``, grouped-query attention (``n_kv_head`` key/value heads shared by groups
of query heads), QK-norm (an RMSNorm over each query and key head before the rotation, as in
modded-nanogpt and Qwen3) and tied or untied input and output embeddings.

Module and parameter names are those of Hugging Face's ``LlamaForCausalLM`` (``Qwen3ForCausalLM``
with QK-norm), and the rotation is the same "rotate half" form, so the state dict is theirs key for
key: exporting and converting rename nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from openllm.core.errors import OpenLLMError
from openllm.model.base import LanguageModel
from openllm.model.config import ModelConfig
from openllm.model.kv_cache import KVCache, attend
from openllm.model.registry import Architecture, LoRATarget, register


def rotary_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim) of every position, in float32.

    Made on the CPU even under a ``torch.device("meta")`` context (the checkpoint's shape checks): the
    first meta ``arange`` of a process costs 1.5 s of imports, and these small tables move with the model.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's two halves (x1, x2) by the position's angles: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    QKV_BIAS = False  # biases on the query, key and value projections (Qwen2's one difference)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.d = config.n_head, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.d, bias=self.QKV_BIAS)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv * self.d, bias=self.QKV_BIAS)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv * self.d, bias=self.QKV_BIAS)
        self.o_proj = nn.Linear(self.n_head * self.d, config.n_embd, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.d, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.d, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout

    def forward(self, x, cache: KVCache | None, layer: int, positions: torch.Tensor, rope) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.d).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        if cache is None:
            y = attend(q, k, v, dropout=self.dropout if self.training else 0.0)
        else:
            y = cache.attend(layer, q, k, v, positions)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    ATTENTION: type[Attention] = Attention

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = self.ATTENTION(config)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, positions, rope) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cache, layer, positions, rope))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Llama(LanguageModel):
    ARCHITECTURE = "Llama (pre-RMSNorm, rotary positions, SwiGLU, no biases)"
    BLOCKS = "model.layers."
    EMBEDDING = "model.embed_tokens.weight"
    BLOCK: type[Block] = Block

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        cos, sin = rotary_tables(config)
        # not in the state dict: they follow from the config (Hugging Face does not store them either)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
                layers=nn.ModuleList([self.BLOCK(config) for _ in range(config.n_layer)]),
                norm=nn.RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model["embed_tokens"].weight  # type: ignore[assignment]
        self.init_weights(residual=("o_proj.weight", "down_proj.weight"))

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions`` ((T,) or (B, T)), shaped to broadcast over the heads."""
        return self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3)

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model["layers"]  # type: ignore[return-value]

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop(self.model["embed_tokens"](idx))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model["norm"](x)


# ------------------------------------------------------------------------------------ registration

ROTARY_FIELDS = ("n_kv_head", "intermediate_size", "rope_theta", "tie_embeddings", "norm_eps")


def swiglu_width(config: ModelConfig) -> int:
    """``intermediate_size``, or 8/3 n_embd rounded up to 64 (the SwiGLU MLP's three matrices then hold about
    as many weights as GPT-2's two)."""
    return config.intermediate_size or -(-8 * config.n_embd // 3 // 64) * 64


def check_rotary_config(config: ModelConfig) -> None:
    """The rules of a rotary, grouped-query block (Llama and the families built on it)."""
    for name in ("n_kv_head", "intermediate_size"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise OpenLLMError(f"model config: {name} must be a positive integer, got {value!r}")
    if config.n_head % config.kv_heads:
        raise OpenLLMError(f"model config: n_head ({config.n_head}) must be a multiple of n_kv_head")
    if (config.n_embd // config.n_head) % 2:
        raise OpenLLMError("model config: rotary positions need an even head size (n_embd / n_head)")
    for name in ("rope_theta", "norm_eps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise OpenLLMError(f"model config: {name} must be a positive number, got {value!r}")
    for name in ("qk_norm", "tie_embeddings"):
        if not isinstance(getattr(config, name), bool):
            raise OpenLLMError(f"model config: {name} must be true or false, got {getattr(config, name)!r}")


def describe_rotary(config: ModelConfig) -> dict:
    return {"mlp": "SwiGLU (SiLU gate)", "intermediate_size": config.mlp_hidden, "n_kv_head": config.kv_heads}


# The matrices LoRA may adapt in a Llama block (and the families built on it), by target name.
LORA_TARGETS = {
    "q": LoRATarget("self_attn.q_proj"),
    "k": LoRATarget("self_attn.k_proj"),
    "v": LoRATarget("self_attn.v_proj"),
    "o": LoRATarget("self_attn.o_proj"),
    "gate": LoRATarget("mlp.gate_proj"),
    "up": LoRATarget("mlp.up_proj"),
    "down": LoRATarget("mlp.down_proj"),
}


register(
    Architecture(
        name="llama",
        model=Llama,
        fields=(*ROTARY_FIELDS, "qk_norm"),
        bias=False,
        mlp_hidden=swiglu_width,
        check=check_rotary_config,
        described=describe_rotary,
        lora_targets=LORA_TARGETS,
    )
)
