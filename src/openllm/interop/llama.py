"""The Llama family adapter: our ``arch: llama`` config to and from Hugging Face ``LlamaForCausalLM``
(``Qwen3ForCausalLM`` for a model with QK-norm, which is that architecture plus per-head RMSNorms), and
its GGUF layout (llama.cpp's ``llama`` or ``qwen3``). The Llama-block helpers here serve Qwen2 too.

The model already uses Hugging Face's parameter names and rotation, so the state dict passes through
unchanged; only a tied head is stored once, as ``transformers`` does. A configuration this model
cannot reproduce (other activations, biases, rope scaling, a head size that is not hidden/heads) is
refused by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from openllm import __version__
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import SpecialTokens
from openllm.interop.families import Family, GGUFLayout, register
from openllm.interop.gguf_file import interleave_halves
from openllm.model.config import ImportedFields, ModelConfig

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
HF_CONFIG_KEYS = (
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_act",
)


def to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return {
        k: t.detach().to(torch.float32).contiguous().clone()
        for k, t in state.items()
        if not (k == "lm_head.weight" and config.tie_embeddings)
    }


def from_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old transformers saved it
    if config.tie_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def hf_model_type(config: ModelConfig) -> str:
    return "qwen3" if config.qk_norm else "llama"


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    return rotary_config_to_hf(config, special, extra, hf_model_type(config), MODEL_TYPES[hf_model_type(config)])


def rotary_config_to_hf(
    config: ModelConfig, special: SpecialTokens, extra: dict | None, model_type: str, hf_class: str
) -> dict:
    """The config.json of a Llama-block model (Llama, Qwen3, Qwen2): one layout, the family's type and class."""
    out = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4 reads this key, 5 the next one
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        **special.as_config_ids(),
        "dtype": "float32",
        "openllm": {"version": __version__, **(extra or {})},
    }
    if model_type != "llama":  # the Qwen configs say there is no sliding window
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer})
    return out


def config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    """Our ModelConfig for a LlamaConfig / Qwen3Config dict, refusing variants this model cannot reproduce and
    any numeric field of the wrong type or range, by name."""
    return rotary_config_from_hf(cfg, origin, arch="llama", bias=False, qk_norm=cfg.get("model_type") == "qwen3")


def rotary_config_from_hf(cfg: dict, origin: str, arch: str, bias: bool, qk_norm: bool) -> ModelConfig:
    """Our ModelConfig of architecture ``arch`` for the config.json of a Llama-block model."""
    f = ImportedFields(cfg, f"{origin}: config.json")
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = f.mapping(rope_key)
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and not (key == "attention_bias" and bias):  # Qwen2's q/k/v biases are its own
            problems.append(key)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if cfg.get("head_dim") is not None and f.integer("head_dim") * heads != hidden:
        problems.append(f"head_dim {cfg['head_dim']} (not hidden_size / num_attention_heads)")
    if f.integer("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {cfg.get('pretraining_tp')}")
    if cfg.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if problems:
        raise OpenLLMError(f"{origin}: unsupported {cfg.get('model_type')} variant ({', '.join(problems)})")
    kv_heads = f.integer("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
    width = f.integer("intermediate_size")
    default = ModelConfig(arch=arch, bias=bias, n_head=heads, n_embd=hidden)
    rope_fields = ImportedFields(rope, f"{origin}: config.json {rope_key}")
    theta = rope_fields.number("rope_theta") if "rope_theta" in rope else f.number("rope_theta", 10000.0)
    return ModelConfig(
        arch=arch,
        bias=bias,
        vocab_size=f.integer("vocab_size"),
        n_layer=f.integer("num_hidden_layers"),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=None if kv_heads == heads else kv_heads,  # written as our own configs write it
        intermediate_size=None if width == default.mlp_hidden else width,
        block_size=f.integer("max_position_embeddings"),
        rope_theta=theta,
        norm_eps=f.number("rms_norm_eps", 1e-6),
        qk_norm=qk_norm,
        tie_embeddings=f.flag("tie_word_embeddings", False),
        dropout=f.number("attention_dropout", 0.0, probability=True),
    )


# ------------------------------------------------------------------------------------ GGUF

# our (= Hugging Face's) names -> llama.cpp's, per layer and for the rest
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
QK_NORM = ("attn_q_norm.weight", "attn_k_norm.weight")
QKV_BIAS = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


def gguf_arch(config: ModelConfig) -> str:
    return "qwen3" if config.qk_norm else "llama"


def rotary_gguf_metadata(writer: Any, config: ModelConfig) -> None:
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))


def rotary_gguf_tensors(
    state: dict[str, torch.Tensor], config: ModelConfig, interleave: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under llama.cpp's name. Its ``llama`` architecture rotates interleaved pairs of each head,
    where our model (like ``transformers``) rotates the two halves: with ``interleave`` the query and key rows
    are permuted to match, as llama.cpp's own converter does (``qwen2``/``qwen3`` rotate halves, as we do)."""
    for key, tensor in state.items():
        if key == "lm_head.weight":
            if config.tie_embeddings:
                continue  # llama.cpp uses token_embd for the output when there is no output tensor
            target = "output.weight"
        elif key in MODEL_TENSORS:
            target = MODEL_TENSORS[key]
        else:
            _, _, layer, rest = key.split(".", 3)
            target = f"blk.{layer}.{LAYER_TENSORS[rest]}"
        t = tensor.detach().to(torch.float32)
        if interleave and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = interleave_halves(t, config.n_head)
        elif interleave and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = interleave_halves(t, config.kv_heads)
        yield target, t


def rotary_gguf_expected(layers: int, leave_out: tuple[str, ...]) -> list[str]:
    per_layer = [v for v in LAYER_TENSORS.values() if v not in leave_out]
    return [*MODEL_TENSORS.values(), *(f"blk.{i}.{v}" for i in range(layers) for v in per_layer)]


register(
    Family(
        arch="llama",
        hf_model_types=MODEL_TYPES,
        hf_names={"llama": "Llama", "qwen3": "Qwen3"},
        to_hf=to_hf,
        from_hf=from_hf,
        config_to_hf=config_to_hf,
        config_from_hf=config_from_hf,
        hf_config_keys=HF_CONFIG_KEYS,
        gguf=GGUFLayout(
            arch=gguf_arch,
            gguf_archs=("llama", "qwen3"),
            metadata=rotary_gguf_metadata,
            tensors=lambda state, config: rotary_gguf_tensors(state, config, interleave=gguf_arch(config) == "llama"),
            expected=lambda arch, layers: rotary_gguf_expected(
                layers, QKV_BIAS if arch == "qwen3" else QKV_BIAS + QK_NORM
            ),
        ),
    )
)
