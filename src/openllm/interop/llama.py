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
from openllm.model.config import ModelConfig

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
    try:
        return _config_from_hf(cfg, origin)
    except (TypeError, ValueError) as exc:
        raise OpenLLMError(f"{origin}: config.json has a value of the wrong kind ({exc})") from None
    except KeyError as exc:
        raise OpenLLMError(f"{origin}: config.json lacks {exc.args[0]}") from None


def _config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(key)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    if cfg.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {cfg.get('head_dim')} (not hidden_size / num_attention_heads)")
    if cfg.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {cfg.get('pretraining_tp')}")
    if cfg.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if problems:
        raise OpenLLMError(f"{origin}: unsupported {cfg.get('model_type')} variant ({', '.join(problems)})")
    kv_heads, width = int(cfg.get("num_key_value_heads") or heads), int(cfg["intermediate_size"])
    default = ModelConfig(arch="llama", bias=False, n_head=heads, n_embd=hidden)
    return ModelConfig(
        arch="llama",
        bias=False,
        vocab_size=int(cfg["vocab_size"]),
        n_layer=int(cfg["num_hidden_layers"]),
        n_head=heads,
        n_embd=hidden,
        n_kv_head=None if kv_heads == heads else kv_heads,  # written as our own configs write it
        intermediate_size=None if width == default.mlp_hidden else width,
        block_size=int(cfg["max_position_embeddings"]),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_norm=cfg.get("model_type") == "qwen3",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dropout=float(cfg.get("attention_dropout", 0.0)),
    )
