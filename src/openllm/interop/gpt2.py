"""The GPT-2 family adapter: our state dict and config to and from Hugging Face GPT-2, the
nanoGPT-layout checkpoints (legacy OpenLLM, nanoGPT) that share our key names, and the GGUF layout of
llama.cpp's ``gpt2`` architecture.

``to_hf`` / ``from_hf`` translate state dicts, ``config_to_hf`` / ``config_from_hf`` configs (as
torchtitan's state-dict adapters do); :func:`read_hf_dir` reads a Hugging Face directory (of any family).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from openllm import __version__
from openllm.checkpoint import format as ck
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import read_json
from openllm.core.progress import Progress
from openllm.data.tokenizer import SpecialTokens
from openllm.interop.families import Family, GGUFLayout, register
from openllm.model.config import ImportedFields, ModelConfig

EXPORT_WEIGHTS = "model.safetensors"


def is_mask_buffer(key: str, tensor: torch.Tensor) -> bool:
    """The causal-mask buffers that legacy OpenLLM, nanoGPT and old transformers GPT-2 saved with the weights."""
    return key.endswith((".attn.bias", ".attn.masked_bias")) and tensor.dim() in (0, 4)


def without_mask_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not is_mask_buffer(k, v)}


def tie_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``lm_head.weight`` as the token embedding when a source stored the tied head once."""
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state = {**state, "lm_head.weight": state["transformer.wte.weight"]}
    return state


def is_export_dir(path: Path) -> bool:
    """A Hugging Face style directory (ours or another's) rather than a run directory."""
    return path.is_dir() and (path / EXPORT_WEIGHTS).is_file() and not (path / "best_model.pt").is_file()


# Linear layers that Hugging Face GPT-2 stores as Conv1D, i.e. transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's names and layout (tied head omitted, zero biases if bias=False)."""
    out = {}
    progress = Progress(len(state), "converting weights", "tensors")
    for k, t in state.items():
        progress.update()
        if k == "lm_head.weight":
            continue
        t = t.detach().to(torch.float32)
        out[k] = (t.t() if k.endswith(CONV1D) else t).contiguous().clone()
    if not config.bias:
        C = config.n_embd
        sizes = {
            "ln_1.bias": C,
            "ln_2.bias": C,
            "attn.c_attn.bias": 3 * C,
            "attn.c_proj.bias": C,
            "mlp.c_fc.bias": 4 * C,
            "mlp.c_proj.bias": C,
        }
        for i in range(config.n_layer):
            for name, n in sizes.items():
                out[f"transformer.h.{i}.{name}"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(C)
    progress.close()
    return out


def from_hf(state: dict[str, torch.Tensor], config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """GPT-2 (Conv1D layout, with or without the ``transformer.`` prefix) to our layout; mask buffers dropped,
    and for a bias-free ``config`` the zero biases our export wrote."""
    out = {}
    for k, t in without_mask_buffers(state).items():
        name = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[name] = (t.t() if name.endswith(CONV1D) else t).contiguous()
    if config is not None and not config.bias:
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return tie_head(out)


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        **special.as_config_ids(),
        "dtype": "float32",
        "openllm": {"version": __version__, "bias": config.bias, "activation": config.activation, **(extra or {})},
    }


def read_config_json(path: Path, missing_hint: str = "") -> dict:
    """A model directory's config.json as a dict, or one clear error."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise OpenLLMError(f"{path} has no config.json{missing_hint}")
    cfg = read_json(cfg_file, "model config")
    if not isinstance(cfg, dict):
        raise OpenLLMError(f"{cfg_file} must hold a JSON object")
    return cfg


def read_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights (safetensors preferred, else pytorch_model.bin loaded weights-only)."""
    from safetensors.torch import load_file

    cfg = read_config_json(path)
    if (path / EXPORT_WEIGHTS).is_file():
        try:
            state = load_file(str(path / EXPORT_WEIGHTS))
        except Exception:  # safetensors raises its own error types
            raise OpenLLMError(f"{path / EXPORT_WEIGHTS} is truncated or not a safetensors file") from None
    elif (path / "pytorch_model.bin").is_file():
        state = ck.load_checkpoint(path / "pytorch_model.bin")
    else:
        raise OpenLLMError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return cfg, state


def config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    """Our ModelConfig for a GPT2Config dict, refusing variants this model cannot reproduce and any numeric
    field of the wrong type or range, by name."""
    f = ImportedFields(cfg, f"{origin}: config.json")
    act = cfg.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    n_embd = f.integer("n_embd")
    problems = []
    if act not in acts:
        problems.append(f"activation_function {act!r}")
    if cfg.get("n_inner") is not None and f.integer("n_inner") != 4 * n_embd:
        problems.append(f"n_inner {cfg['n_inner']}")
    if abs(f.number("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {cfg.get('layer_norm_epsilon')}")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        problems.append("non-standard attention scaling")
    if cfg.get("tie_word_embeddings") is False:
        problems.append("untied output head")
    if problems:
        raise OpenLLMError(f"{origin}: unsupported GPT-2 variant ({', '.join(problems)})")
    extra = ImportedFields(f.mapping("openllm"), f"{origin}: config.json openllm")
    context = "n_positions" if cfg.get("n_positions") is not None else "n_ctx"
    return ModelConfig(
        vocab_size=f.integer("vocab_size"),
        n_layer=f.integer("n_layer"),
        n_head=f.integer("n_head"),
        n_embd=n_embd,
        block_size=f.integer(context),
        dropout=f.number("resid_pdrop", 0.0, probability=True),
        bias=extra.flag("bias", True),
        activation=extra.cfg.get("activation", acts[act]),
    )


# ------------------------------------------------------------------------------------ GGUF

# our names -> llama.cpp's ``gpt2`` architecture (nn.Linear layout, as our state dict holds it)
GGUF_LAYER = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
GGUF_MODEL = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
}


def _gguf_metadata(writer: Any, config: ModelConfig) -> None:
    writer.add_layer_norm_eps(1e-5)


def _gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under llama.cpp's name; a bias-free model gets the zero biases llama.cpp's ``gpt2`` needs, and
    the tied head is written out as ``output.weight``."""
    for key, tensor in state.items():
        if key == "lm_head.weight":
            yield "output.weight", tensor.detach().to(torch.float32)
        elif key in GGUF_MODEL:
            yield GGUF_MODEL[key], tensor.detach().to(torch.float32)
        else:
            _, _, layer, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            yield f"blk.{layer}.{GGUF_LAYER[module]}.{kind}", tensor.detach().to(torch.float32)
            if not config.bias and kind == "weight":
                yield f"blk.{layer}.{GGUF_LAYER[module]}.bias", torch.zeros(tensor.shape[0])
    if not config.bias:
        yield "output_norm.bias", torch.zeros(config.n_embd)


def _gguf_expected(arch: str, layers: int) -> list[str]:
    per_layer = [f"{name}.{kind}" for name in GGUF_LAYER.values() for kind in ("weight", "bias")]
    return [*GGUF_MODEL.values(), "output.weight", *(f"blk.{i}.{v}" for i in range(layers) for v in per_layer)]


register(
    Family(
        arch="gpt2",
        hf_model_types={"gpt2": "GPT2LMHeadModel"},
        hf_names={"gpt2": "GPT-2"},
        to_hf=to_hf,
        from_hf=from_hf,
        config_to_hf=config_to_hf,
        config_from_hf=config_from_hf,
        hf_config_keys=("vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "activation_function"),
        gguf=GGUFLayout(
            arch=lambda config: "gpt2",
            gguf_archs=("gpt2",),
            metadata=_gguf_metadata,
            tensors=_gguf_tensors,
            expected=_gguf_expected,
        ),
    )
)
