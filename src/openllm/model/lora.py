"""LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

:func:`apply_lora` freezes every weight of a model and gives each target matrix ``W`` (out x in) a trainable
low-rank update: the layer computes ``W x + b + (alpha / rank) * B A dropout(x)``, with ``A`` (rank x in)
Kaiming-uniform and ``B`` (out x rank) zero, so the adapted model starts out computing exactly what the base
computes. :func:`merge_lora` folds the updates into the weights (``W += scale * B @ A``) and gives back a plain
model; :func:`merged_state_dict` gives its state dict without touching the model.

Targets have architecture-neutral names (:data:`TARGETS`: ``q, k, v, o`` the attention projections, ``gate,
up, down`` the MLP's); each architecture maps them onto its modules in its registration
(``Architecture.lora_targets``, :class:`~openllm.model.registry.LoRATarget`). GPT-2's fused ``c_attn`` holds q,
k and v as three slices of output rows: each is adapted on its own slice, so ``q`` means the same matrix in every
architecture. The default targets are ``q`` and ``v``: the pair the LoRA paper found best for a given number of
trainable parameters (section 7.1) and the default of peft and litgpt, so figures compare with theirs.

A wrapped layer keeps the base layer's ``weight`` and ``bias`` under their names, so the base keys of the state
dict are unchanged and the adapters add ``<layer>.lora_A.<target>`` and ``<layer>.lora_B.<target>``. The
model's forward, generation and KV cache are untouched: only the target layers compute differently.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from openllm.core.errors import OpenLLMError
from openllm.model.base import LanguageModel

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # every architecture's targets are among these, in this order
DEFAULT_TARGETS = ("q", "v")
MAX_RANK = 65536  # beyond any matrix of a sane model (a target's own size is checked by apply_lora)
_ADAPTER_KEY = re.compile(r"\.lora_[AB]\.[a-z]+$")


def _option_number(name: str, value: Any, integer: bool) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "a whole number" if integer else "a number"
        raise OpenLLMError(f"{name} must be {kind}, got {value!r}")
    return value


@dataclass(frozen=True)
class LoRAConfig:
    """What the ``--lora-*`` options say, checked when made: a LoRAConfig is always valid (a bad value is one
    error naming its option). ``targets`` may be given as "q,v"; it is kept in :data:`TARGETS` order, so two
    spellings of one choice are equal (and the adapters' parameter order, which the optimizer state follows,
    is the same)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        rank = _option_number("--lora-rank", self.rank, integer=True)
        if not 1 <= rank <= MAX_RANK:
            raise OpenLLMError(
                f"--lora-rank must be between 1 and {MAX_RANK:,} for LoRA (0 means full fine-tuning), got {rank}"
            )
        if _option_number("--lora-alpha", self.alpha, integer=False) <= 0:
            raise OpenLLMError(f"--lora-alpha must be a positive number, got {self.alpha!r}")
        if not 0 <= _option_number("--lora-dropout", self.dropout, integer=False) < 1:
            raise OpenLLMError(f"--lora-dropout must be at least 0 and below 1, got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", _checked_targets(self.targets))

    @property
    def scale(self) -> float:
        """What the adapters' product is multiplied by: alpha / rank (so alpha sets the update's size whatever
        the rank, as in the paper)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Any) -> LoRAConfig:
        """The config :meth:`to_dict` wrote (a checkpoint's); anything else is one error."""
        if not isinstance(d, dict):
            raise OpenLLMError(f"LoRA config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__), key=str)
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if unknown or missing:
            what = f"unknown field {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
            raise OpenLLMError(f"LoRA config has {what}")
        return cls(**d)


def _checked_targets(targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise OpenLLMError(f"--lora-targets must be a comma-separated list of names, got {targets!r}")
    if not any(targets):  # none, or only empty names ("", " , ")
        raise OpenLLMError(f"--lora-targets names no matrix (choose from {', '.join(TARGETS)})")
    for t in targets:
        if t not in TARGETS:
            raise OpenLLMError(f"--lora-targets: unknown target {t!r} (choose from {', '.join(TARGETS)})")
        if targets.count(t) > 1:
            raise OpenLLMError(f"--lora-targets names {t} twice")
    return tuple(t for t in TARGETS if t in targets)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (its own ``weight`` and ``bias`` tensors, under their names) plus one low-rank
    update per target, each on a slice of the output rows (the whole of them for an unfused layer)."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], config: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # (None: registered as absent, as nn.Linear does)
        self.slices = slices
        self.scale = config.scale
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(config.rank, self.in_features, device=device, dtype=dtype)) for t in slices}
        )
        self.lora_B = nn.ParameterDict(
            {
                t: nn.Parameter(torch.zeros(stop - start, config.rank, device=device, dtype=dtype))
                for t, (start, stop) in slices.items()
            }
        )
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own initialisation, as the paper's code
        self.lora_dropout = nn.Dropout(config.dropout)  # on the adapters' input only, and only in training

    weight: torch.Tensor
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        for t, (start, stop) in self.slices.items():
            delta = F.linear(F.linear(h, self.lora_A[t]), self.lora_B[t]) * self.scale
            if stop - start != self.out_features:  # a slice of a fused projection: zeros beside it
                delta = F.pad(delta, (start, self.out_features - stop))
            out = out + delta
        return out

    def delta(self) -> torch.Tensor:
        """The update of the whole weight, ``scale * B @ A`` in each slice (zero elsewhere)."""
        d = torch.zeros_like(self.weight)
        for t, (start, stop) in self.slices.items():
            d[start:stop] = (self.lora_B[t] @ self.lora_A[t]) * self.scale
        return d

    def extra_repr(self) -> str:
        rank = next(iter(self.lora_A.values())).shape[0]
        return f"in={self.in_features}, out={self.out_features}, rank={rank}, targets={','.join(self.slices)}"


def _architecture(model: LanguageModel):
    from openllm.model.registry import architecture

    return architecture(model.config.arch)


def target_layers(arch_name: str, n_layer: int, config: LoRAConfig, blocks: str) -> dict[str, dict[str, tuple]]:
    """Every layer the targets adapt, by module name (``blocks`` is the blocks' state-dict prefix), with its
    targets and the (part, parts) slice each takes; one error naming a target the architecture lacks."""
    from openllm.model.registry import architecture

    arch = architecture(arch_name)
    known = arch.lora_targets
    if not known:
        raise OpenLLMError(f"--lora-rank: arch {arch_name} declares no matrices LoRA can adapt")
    for t in config.targets:
        if t not in known:
            raise OpenLLMError(f"--lora-targets: arch {arch_name} has no {t} matrix (it has {', '.join(known)})")
    layers: dict[str, dict[str, tuple]] = {}
    for i in range(n_layer):
        for t in config.targets:
            where = known[t]
            layers.setdefault(f"{blocks}{i}.{where.module}", {})[t] = (where.part, where.parts)
    return layers


def _slices(out_features: int, parts: dict[str, tuple]) -> dict[str, tuple[int, int]]:
    slices = {}
    for t, (part, n) in parts.items():
        size = out_features // n
        slices[t] = (part * size, (part + 1) * size)
    return slices


def apply_lora(model: LanguageModel, config: LoRAConfig) -> None:
    """Freeze every parameter of ``model`` and wrap each target layer in a :class:`LoRALinear` (in place).
    A rank beyond a target matrix's smaller side, a target the architecture lacks or a model that already has
    adapters is one error."""
    if has_lora(model):
        raise OpenLLMError("the model already has LoRA adapters (merge them first)")
    layers = target_layers(model.config.arch, len(_architecture(model).blocks(model)), config, model.BLOCKS)
    for name, parts in layers.items():
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise OpenLLMError(f"--lora-targets: {name} is not a linear layer")
        slices = _slices(base.out_features, parts)
        for t, (start, stop) in slices.items():
            if config.rank > min(base.in_features, stop - start):
                raise OpenLLMError(
                    f"--lora-rank {config.rank} exceeds the {t} matrix of this model ({stop - start} x "
                    f"{base.in_features}): at most {min(base.in_features, stop - start)}"
                )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parts in layers.items():
        parent, _, attr = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        setattr(model.get_submodule(parent), attr, LoRALinear(base, _slices(base.out_features, parts), config))


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA adapter's (``...lora_A.q``); a base model has no such key."""
    return bool(_ADAPTER_KEY.search(key))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (what a LoRA checkpoint holds), in ``named_parameters()`` order."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def adapter_shapes(
    base_shapes: dict[str, tuple[int, ...]], arch: str, n_layer: int, blocks: str, config: LoRAConfig
) -> dict[str, tuple[int, ...]]:
    """The key and shape of every adapter tensor :func:`apply_lora` gives a model whose state dict has
    ``base_shapes`` (a checkpoint's are checked against these without building anything)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, parts in target_layers(arch, n_layer, config, blocks).items():
        out_features, in_features = base_shapes[f"{name}.weight"]
        for t, (start, stop) in _slices(out_features, parts).items():
            shapes[f"{name}.lora_A.{t}"] = (config.rank, in_features)
            shapes[f"{name}.lora_B.{t}"] = (stop - start, config.rank)
    return shapes


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the adapters, and whole every base tensor the trainer made trainable again
    after :func:`apply_lora` (say, an embedding grown for new special tokens; a tied one under both its keys).
    Without such, :func:`adapter_state_dict`."""
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in trained}
    return {k: v for k, v in model.state_dict().items() if k in names}


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a LoRA checkpoint's tensors (:func:`lora_state_dict`'s: the adapters, and any base tensor trained
    along) into a model :func:`apply_lora` made. Strict: a missing, unexpected or misshapen tensor is one
    error, and nothing is copied then."""
    if not has_lora(model):
        raise OpenLLMError("the model has no LoRA adapters to load into (apply_lora first)")
    own = lora_state_dict(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} has shape {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, the model needs "
        f"{tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and not (isinstance(v, torch.Tensor) and v.shape == own[k].shape)
    ]
    problems = (
        ([f"{len(missing)} tensors missing (first: {missing[0]})"] if missing else [])
        + ([f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})"] if unexpected else [])
        + wrong[:1]
    )
    if problems:
        raise OpenLLMError(f"the LoRA adapters do not fit this model: {'; '.join(problems)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the merged model would have (the base keys exactly, each adapted weight with its
    update added), leaving ``model`` as it is."""
    layers = _lora_layers(model)
    with torch.no_grad():
        merged = {f"{name}.weight": layer.weight + layer.delta() for name, layer in layers.items()}
    return {k: merged.get(k, v) for k, v in model.state_dict().items() if not is_adapter_key(k)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (``W += scale * B @ A``) and put a plain ``nn.Linear`` holding that
    weight in its place (in place): the model is an ordinary one again, every parameter trainable as built."""
    for name, layer in _lora_layers(model).items():
        layer.weight.add_(layer.delta())
        plain = nn.Linear.__new__(nn.Linear)  # (its __init__ would allocate and initialise a weight to throw away)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = layer.in_features, layer.out_features
        plain.weight = layer.weight
        plain.register_parameter("bias", layer.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
    for p in model.parameters():
        p.requires_grad_(True)


def base_sha256(source: nn.Module | dict[str, torch.Tensor]) -> str:
    """A hash of a model's base weights (a model, with or without adapters, or a state dict): every tensor but
    the adapters, in sorted key order, by key, dtype, shape and bytes. The same in every process and on every
    device; hash the base as loaded (a checkpoint's state in a float32 model), since another dtype is other
    bytes."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    h = hashlib.sha256()
    for key in sorted(k for k in state if not is_adapter_key(k)):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()
