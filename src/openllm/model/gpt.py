"""The GPT-2 model in the legacy OpenLLM (nanoGPT) layout.

Learned absolute positions, pre-LayerNorm blocks, a fused query/key/value projection, an
exact-GELU MLP of 4x width, a final LayerNorm and an output head tied to the token embedding.
Attention goes through ``scaled_dot_product_attention`` (flash/memory-efficient kernels where the
device has them), so there is no mask buffer in the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from openllm.model.config import ModelConfig

# A per-layer (key, value) cache for incremental decoding: tensors of shape (B, n_head, T, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        past_len = k.size(2) - T
        if past_len == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new query may see every cached position
        else:  # a chunk after a cache: query i sees keys up to past_len + i
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past_len)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


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

    def forward(self, x: torch.Tensor, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    ARCHITECTURE = "GPT-2 (pre-LayerNorm, learned positions, tied head)"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
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
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, stored once
        self.apply(self._init_weights)
        # Residual projections scaled down by depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def optimizer_groups(self) -> tuple[list[str], list[str]]:
        """Parameter names, in ``named_parameters()`` order, that take weight decay (matrices and embeddings)
        and that do not (biases, LayerNorm gains): the two AdamW groups, as nanoGPT forms them too."""
        named = list(self.named_parameters())
        return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters with the tied head counted once; optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if exclude_embeddings else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``idx`` (B, T) and, with ``targets``, the mean cross-entropy loss (else None)."""
        x, _ = self._hidden(idx, None, keep_cache=False)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_with_cache(self, idx: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Logits for ``idx`` continuing after the cached positions ``past``, and the extended cache."""
        x, cache = self._hidden(idx, past, keep_cache=True)
        return self.lm_head(x), cache

    def _hidden(self, idx: torch.Tensor, past: KVCache | None, keep_cache: bool) -> tuple[torch.Tensor, KVCache]:
        B, T = idx.shape
        start = past[0][0].size(2) if past else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and not keep_cache:
                x, present = checkpoint(block, x, use_reentrant=False)
            else:
                x, present = block(x, past[i] if past else None)
            if keep_cache:
                presents.append(present)
        return self.transformer.ln_f(x), presents

    def summary(self, seq_len: int) -> dict:
        """The checkpoint's ``model_info``: what this model is, in numbers."""
        return {
            "architecture": self.ARCHITECTURE,
            "parameters": self.num_parameters(),
            "parameters_without_positions": self.num_parameters(exclude_embeddings=True),
            "vocab_size": self.config.vocab_size,
            "context": self.config.block_size,
            "dtype": "float32",
            "flops_per_token": self.flops_per_token(seq_len),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matrices plus 12 * L * d * T for attention (PaLM, app. B)."""
        n = self.num_parameters(exclude_embeddings=True)
        c = self.config
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len
