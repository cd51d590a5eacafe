"""What every architecture shares: the loss, cached decoding, the blocks loop, initialisation, optimizer
groups and the numbers a checkpoint records. An architecture supplies its modules, ``blocks``, ``embed``,
``final_norm`` and, with rotary positions, ``rotary``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from openllm.model.config import ModelConfig
from openllm.model.kv_cache import KVCache


class LanguageModel(nn.Module):
    ARCHITECTURE = ""
    BLOCKS = ""  # the prefix of the transformer blocks' parameters (Muon takes their matrices)
    EMBEDDING = ""  # the token embedding's state-dict key
    config: ModelConfig
    blocks: nn.ModuleList
    lm_head: nn.Linear

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False

    def init_weights(self, residual: str | tuple[str, ...]) -> None:
        """Normal(0, 0.02) matrices and embeddings, zero biases; the projections back into the residual
        stream (names ending in ``residual``) scaled down by depth (GPT-2 paper, section 2.3)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(residual):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary-position tables at ``positions`` for the blocks (None: the architecture has none)."""
        return None

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``idx`` (B, T) and, with ``targets``, the mean cross-entropy loss (else None)."""
        logits = self.lm_head(self._hidden(idx, None))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits for ``idx`` (B, T), each row continuing its slot of ``cache`` (which it extends). With
        ``last_only``, for the last position only (B, 1, vocab): a prefill needs no more, and the head over
        every position of a long prompt costs as much as the blocks."""
        hidden = self._hidden(idx, cache)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        cache.extend(*idx.shape)
        return logits

    def new_cache(self, slots: int = 1, max_len: int | None = None) -> KVCache:
        """An empty cache for ``slots`` sequences of up to ``max_len`` (default: the context) positions."""
        weight = self.lm_head.weight
        return KVCache(self.config, slots, max_len or self.config.block_size, weight.device, self._cache_dtype())

    def cache_bytes(self, slots: int = 1, max_len: int | None = None) -> int:
        """What :meth:`new_cache` would allocate, in bytes (keys and values of every layer)."""
        c = self.config
        per_layer = slots * c.kv_heads * (max_len or c.block_size) * c.head_dim * self._cache_dtype().itemsize
        return 2 * c.n_layer * per_layer

    def _cache_dtype(self) -> torch.dtype:
        weight = self.lm_head.weight
        return torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled() else weight.dtype

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            positions = torch.arange(T, dtype=torch.long, device=idx.device)
        else:
            positions = cache.positions(B, T, idx.device)
        x = self.embed(idx, positions)
        rope = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, None, i, positions, rope, use_reentrant=False)
            else:
                x = block(x, cache, i, positions, rope)
        return self.final_norm(x)

    def optimizer_groups(self) -> tuple[list[str], list[str]]:
        """Parameter names, in ``named_parameters()`` order, that take weight decay (matrices and embeddings)
        and that do not (biases, norm gains): the two AdamW groups, as nanoGPT forms them too. Frozen
        parameters (the base weights under LoRA adapters, model/lora.py) are in neither: nothing trains them."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]

    def position_parameters(self) -> int:
        return 0

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters with a tied head counted once; optionally without a learned position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.position_parameters() if exclude_embeddings else n

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
