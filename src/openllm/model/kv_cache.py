"""Keys and values kept between decoding steps, for one sequence or a batch of independent ones.

A :class:`KVCache` preallocates, per layer, keys and values of shape ``(slots, kv_heads, max_len,
head_dim)`` and knows each slot's length. A forward pass over ``idx`` of shape ``(B, T)`` uses the
first ``B`` slots: token ``t`` of row ``b`` sits at position ``lengths[b] + t``, its key and value are
written there, and it attends to every position of its own row up to its own. Rows of different
lengths therefore decode together in one batched step (the server's continuous batching), and a row
computes exactly what it would alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openllm.model.config import ModelConfig


class KVCache:
    def __init__(
        self, config: ModelConfig, slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        if max_len > config.block_size:
            raise ValueError(f"a cache of {max_len} positions exceeds the context of {config.block_size}")
        shape = (slots, config.kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = [0] * slots  # positions filled, per slot (host-side: no device sync to read them)
        self.max_len = max_len

    @classmethod
    def _view(cls, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int], max_len: int) -> KVCache:
        view = cls.__new__(cls)
        view.keys, view.values, view.lengths, view.max_len = keys, values, lengths, max_len
        return view

    def slot(self, i: int) -> KVCache:
        """Slot ``i`` alone, sharing storage (a prompt is prefilled into its slot this way); its length is
        copied back by :meth:`commit_slot`."""
        return KVCache._view(
            [k[i : i + 1] for k in self.keys], [v[i : i + 1] for v in self.values], [self.lengths[i]], self.max_len
        )

    def commit_slot(self, i: int, view: KVCache) -> None:
        self.lengths[i] = view.lengths[0]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst`` (keeping the rows in use at the front)."""
        n = self.lengths[src]
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def positions(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """Positions (batch, length) of the tokens about to be added to the first ``batch`` slots."""
        if max(self.lengths[:batch]) + length > self.max_len:
            raise ValueError(f"sequence exceeds the cache's {self.max_len} positions")
        start = torch.tensor(self.lengths[:batch], device=device)
        return start[:, None] + torch.arange(length, device=device)

    def extend(self, batch: int, length: int) -> None:
        """Count ``length`` new positions in each of the first ``batch`` slots (after every layer wrote them)."""
        for b in range(batch):
            self.lengths[b] += length

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Write ``k``/``v`` (B, kv_heads, T, head_dim) at ``positions`` and attend with the queries ``q``."""
        B, T = positions.shape
        if not any(self.lengths[:B]):  # a fresh prefill: the new tokens see only each other
            self.keys[layer][:B, :, :T] = k
            self.values[layer][:B, :, :T] = v
            return attend(q, k, v)
        rows = torch.arange(B, device=k.device)[:, None]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)
        limit = max(self.lengths[:B]) + T
        keys, values = self.keys[layer][:B, :, :limit], self.values[layer][:B, :, :limit]
        if T == 1 and len(set(self.lengths[:B])) == 1:
            return attend(q, keys, values, causal=False)  # one new query per row sees every filled position
        visible = torch.arange(limit, device=k.device)[None, None, :] <= positions[:, :, None]  # (B, T, limit)
        return attend(q, keys, values, mask=visible[:, None], causal=False)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention (B, heads, T, head_dim); fewer key/value heads than query heads are
    shared by groups of query heads (grouped-query attention)."""
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, **gqa)
