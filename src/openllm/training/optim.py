"""The optimizer and the seeding of every random generator a run uses."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.optim._muon import _adjust_lr  # Muon's learning-rate scaling, kept PyTorch's

from openllm.core.device import fast_matmul_dtype
from openllm.model import LanguageModel
from openllm.training.config import OptimizerOptions


def configure_optimizer(
    model: LanguageModel, cfg: OptimizerOptions, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer | MuonAdamW:
    """``--optimizer adamw``: AdamW with weight decay on matrices only (not biases, LayerNorms), fused.
    ``--optimizer muon``: Muon (PyTorch's, orthogonalising in the device's fast precision) for the transformer
    blocks' weight matrices, AdamW for the rest."""
    params = dict(model.named_parameters())
    decay, no_decay = model.optimizer_groups()
    hidden = [n for n in decay if n.startswith(model.BLOCKS)] if cfg.optimizer == "muon" else []
    decay = [n for n in decay if n not in hidden]
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    adamw = fused_adamw(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)
    if not hidden:
        return adamw
    # "match_rms_adamw" scales Muon's orthogonalised update to AdamW's size, so one learning-rate schedule
    # drives both parts
    muon = Muon(
        [params[n] for n in hidden],
        lr=learning_rate,
        weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=fast_matmul_dtype(device),
    )
    return MuonAdamW(muon, adamw)


def fused_adamw(groups: list[dict], **options) -> torch.optim.AdamW:
    """PyTorch's fused AdamW (one kernel for all tensors, about 4x the default's speed on the CPU) where this
    torch has it for the device, else the default implementation. Fused, it skips a step on the device when
    handed ``found_inf`` (:func:`step_unless`)."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device in this torch (the CPU before torch 2.4)
        return torch.optim.AdamW(groups, **options)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a step by a flag on the device: OpenLLM's Muon, and PyTorch's fused
    optimizers (those GradScaler hands ``found_inf``). The param groups' own ``fused`` decides, since resuming
    restores it from the checkpoint (AdamW of old CPU runs: unfused)."""
    if isinstance(optimizer, Muon):
        return True
    fused = all(g.get("fused") for g in optimizer.param_groups)
    return fused and getattr(optimizer, "_step_supports_amp_scaling", False)


def step_unless(optimizer: torch.optim.Optimizer | MuonAdamW, bad: torch.Tensor) -> None:
    """Step ``optimizer`` unless ``bad`` (a 0-dim bool tensor on the device) is true, decided on the device:
    the host never waits for the step's gradients to learn whether they were finite. Only an optimizer that
    cannot skip on the device (unfused AdamW from an old CPU checkpoint) reads the flag on the host, which
    on the CPU is a plain read, not a wait."""
    parts = list(optimizer.parts.values()) if isinstance(optimizer, MuonAdamW) else [optimizer]
    found_inf = bad.float()
    for part in parts:
        if not skips_on_device(part):
            if not bad.item():
                part.step()
            continue
        part.found_inf = found_inf  # type: ignore[attr-defined]  # read by the step, as GradScaler hands it
        try:
            part.step()
        finally:
            del part.found_inf  # type: ignore[attr-defined]


def orthogonalise(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
):
    """Muon's quintic Newton-Schulz iteration (as ``torch.optim.Muon`` runs it), computed in ``dtype``: the
    matrix nearest to ``g`` with all singular values close to one."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # not in place: in float32, x may be g itself (the momentum buffer)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """PyTorch's Muon with its orthogonalisation in ``ns_dtype``, the precision the device multiplies in
    natively (``core.device.fast_matmul_dtype``).

    ``torch.optim.Muon`` always orthogonalises in bfloat16: right on GPUs and on CPUs with bf16 instructions,
    but emulated on the others (AVX2), where a bf16 matmul costs about 45x a float32 one and Muon ran the
    tiny preset at a quarter of AdamW's speed. The update and the state (one momentum buffer per matrix) are
    otherwise PyTorch's, so checkpoints move freely between the two; with ``ns_dtype=torch.bfloat16`` the
    steps are PyTorch's bit for bit."""

    def __init__(self, params, *, ns_dtype: torch.dtype, **options):
        super().__init__(params, **options)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        # ``found_inf`` (set by step_unless, 1.0 = skip): the new values are kept only where it is 0, chosen on
        # the device, so a non-finite step leaves weights and momentum as they were (fused AdamW does the same)
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.bool()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                new_buf = buf.lerp_(p.grad, 1 - momentum) if skip is None else buf.lerp(p.grad, 1 - momentum)
                update = p.grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                update = self.orthogonalised(update, group)
                alpha = -_adjust_lr(lr, group["adjust_lr_fn"], p.shape)
                if skip is None:
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update, alpha=alpha)
                else:
                    buf.copy_(torch.where(skip, buf, new_buf))
                    p.copy_(torch.where(skip, p, torch.add(p.mul(1 - lr * group["weight_decay"]), update, alpha=alpha)))

    def orthogonalised(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
        if not hasattr(update, "full_tensor"):
            return orthogonalise(update, *args)
        # --fsdp: a DTensor holds this process's rows only, and Newton-Schulz needs the whole matrix: gather it,
        # orthogonalise it (every process the same), keep this process's slice of the result
        from torch.distributed.tensor import distribute_tensor

        whole = orthogonalise(update.full_tensor(), *args)  # type: ignore[attr-defined]
        return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)  # type: ignore[attr-defined]


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: ``param_groups`` lists both parts' groups (the schedule sets
    their learning rate), and the state dict holds each part under its name."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts.values() for g in part.param_groups]

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(
                "the checkpoint's optimizer state is not a Muon + AdamW state (was it trained with adamw?)"
            )
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
