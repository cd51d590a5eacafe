"""The Llama family adapter: our ``arch: llama`` config to and from Hugging Face ``LlamaForCausalLM``
(``Qwen3ForCausalLM`` for a model with QK-norm, which is that architecture plus per-head RMSNorms).

The model already uses Hugging Face's parameter names and rotation, so the state dict passes through
unchanged; only a tied head is stored once, as ``transformers`` does. A configuration this model
cannot reproduce (other activations, biases, rope scaling, a head size that is not hidden/heads) is
refused by name.
"""

from __future__ import annotations

import torch

from openllm import __version__
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import SpecialTokens
from openllm.model.config import ImportedFields, ModelConfig

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


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


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    model_type = "qwen3" if config.qk_norm else "llama"
    out = {
        "architectures": [MODEL_TYPES[model_type]],
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
        "attention_bias": False,
        "attention_dropout": config.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        **special.as_config_ids(),
        "dtype": "float32",
        "openllm": {"version": __version__, **(extra or {})},
    }
    if config.qk_norm:
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer})
    return out


def config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    """Our ModelConfig for a LlamaConfig / Qwen3Config dict, refusing variants this model cannot reproduce and
    any numeric field of the wrong type or range, by name."""
    f = ImportedFields(cfg, f"{origin}: config.json")
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    rope_key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope = f.mapping(rope_key)
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
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
    default = ModelConfig(arch="llama", bias=False, n_head=heads, n_embd=hidden)
    rope_fields = ImportedFields(rope, f"{origin}: config.json {rope_key}")
    theta = rope_fields.number("rope_theta") if "rope_theta" in rope else f.number("rope_theta", 10000.0)
    return ModelConfig(
        arch="llama",
        bias=False,
        vocab_size=f.integer("vocab_size"),
        n_layer=f.integer("num_hidden_layers"),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=None if kv_heads == heads else kv_heads,  # written as our own configs write it
        intermediate_size=None if width == default.mlp_hidden else width,
        block_size=f.integer("max_position_embeddings"),
        rope_theta=theta,
        norm_eps=f.number("rms_norm_eps", 1e-6),
        qk_norm=cfg.get("model_type") == "qwen3",
        tie_embeddings=f.flag("tie_word_embeddings", False),
        dropout=f.number("attention_dropout", 0.0, probability=True),
    )
