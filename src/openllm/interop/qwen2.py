"""The Qwen2 family adapter: our ``arch: qwen2`` to and from Hugging Face ``Qwen2ForCausalLM`` (Qwen2,
Qwen2.5), and its GGUF layout (llama.cpp's ``qwen2``, which rotates halves as we do, with the query, key
and value biases). Everything but the biases is the Llama block's, so the helpers are :mod:`.llama`'s."""

from __future__ import annotations

from openllm.data.tokenizer import SpecialTokens
from openllm.interop import llama
from openllm.interop.families import Family, GGUFLayout, register
from openllm.model.config import ModelConfig

MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM"}


def config_to_hf(config: ModelConfig, special: SpecialTokens, extra: dict | None = None) -> dict:
    out = llama.rotary_config_to_hf(config, special, extra, "qwen2", MODEL_TYPES["qwen2"])
    del out["attention_bias"], out["mlp_bias"]  # Qwen2Config has neither: its q/k/v biases are always there
    return out


def config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    return llama.rotary_config_from_hf(cfg, origin, arch="qwen2", bias=True, qk_norm=False)


register(
    Family(
        arch="qwen2",
        hf_model_types=MODEL_TYPES,
        hf_names={"qwen2": "Qwen2"},
        to_hf=llama.to_hf,
        from_hf=llama.from_hf,
        config_to_hf=config_to_hf,
        config_from_hf=config_from_hf,
        hf_config_keys=llama.HF_CONFIG_KEYS,
        gguf=GGUFLayout(
            arch=lambda config: "qwen2",
            gguf_archs=("qwen2",),
            metadata=llama.rotary_gguf_metadata,
            tensors=lambda state, config: llama.rotary_gguf_tensors(state, config, interleave=False),
            expected=lambda arch, layers: llama.rotary_gguf_expected(layers, llama.QK_NORM),
        ),
    )
)
