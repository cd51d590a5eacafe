"""``--fsdp``: the model sharded across torchrun's processes with FSDP2, and the moves of its state between the
sharded layout (each process its slice of every parameter and optimizer moment, as DTensors) and the whole
one that checkpoint files and every tool hold.

Each architecture's blocks (``registry``: the modules sharding wraps) are sharded one by one, then the whole
model, so that a forward pass gathers one block's parameters at a time. The optimizer is built afterwards,
over the sharded parameters: AdamW steps each process's slice; Muon needs every matrix whole, so each
process gathers a matrix's update before orthogonalising it (``optim.Muon``) and keeps its own slice of the
result. On a GPU the parameters are computed in bfloat16 and gradients reduced in float32; on the CPU
everything stays float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from openllm.core.errors import OpenLLMError
from openllm.model import LanguageModel
from openllm.model.registry import architecture


def shard_model(model: LanguageModel, device: torch.device, dtype: torch.dtype) -> None:
    """Shard ``model`` in place: each block, then the rest (embedding, final norm, head) as the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dtype == torch.float16:
        raise OpenLLMError(
            "--fsdp trains in bfloat16 or float32: float16 needs loss scaling across the shards, which it does "
            "not do (use --dtype bfloat16)"
        )
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in architecture(model.config.arch).blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(obj: Any, keep: bool = True) -> Any:
    """``obj`` (nested dicts and lists) with every DTensor gathered whole onto the CPU; with ``keep`` false (the
    processes that write nothing) each is gathered and dropped, None in its place. Collective: every process
    calls it, on the same structure."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        full = obj.full_tensor()
        return full.cpu() if keep else None
    if isinstance(obj, dict):
        return {k: whole(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [whole(v, keep) for v in obj]
    return obj


def local_slice(full: torch.Tensor, like: Any) -> Any:
    """The whole tensor ``full`` in the layout of ``like``: its slice on this process when ``like`` is a DTensor
    (no communication: every process holds ``full``), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def model_state_for(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A whole state dict in ``model``'s layout (sharded or not), for ``load_state_dict``."""
    current = model.state_dict()
    return {k: local_slice(v, current[k]) if k in current else v for k, v in state.items()}


def optimizer_state_for(optimizer: Any, state: dict) -> dict:
    """A whole optimizer state dict (one optimizer's, or Muon + AdamW's parts) in the layout of ``optimizer``'s
    parameters: each moment of a parameter's shape is cut to this process's slice; scalars stay whole."""
    parts = getattr(optimizer, "parts", None)
    if parts is not None:
        if set(state) != set(parts):
            return state  # (not Muon + AdamW's: load_state_dict refuses it by name)
        return {name: optimizer_state_for(part, state[name]) for name, part in parts.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = {}
    for index, values in (state.get("state") or {}).items():
        p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        moments[index] = {
            k: local_slice(v, p) if p is not None and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in values.items()
        }
    return {**state, "state": moments}


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside that reduce gradients across processes only when ``sync`` (the last micro-batch of
    an accumulated step): DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``; nothing on one process."""
    wrapped: Any = model
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
        yield
    elif not sync and hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:
        yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A reduced figure (the gradient norm) as a plain tensor: a DTensor is gathered (it is replicated)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
