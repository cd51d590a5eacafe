"""``openllm export --format gguf``: one GGUF file that llama.cpp loads, written with the ``gguf`` package.

Supported: ``arch: llama`` (written as llama.cpp's ``llama`` architecture, or ``qwen3`` for a model
with QK-norm) with a SentencePiece tokenizer (written as llama.cpp's ``llama`` tokenizer: pieces,
scores and token types, the special ids and whether a prompt starts with bos). Anything else is
refused by name rather than written half-right.

llama.cpp's ``llama`` architecture rotates interleaved pairs of each head, where our model (like
``transformers``) rotates the two halves; the query and key rows are permuted to match, as llama.cpp's
own converter does. Its ``qwen3`` architecture rotates halves, so those rows are written as they are.
Weight matrices are written in f32 or f16; norms stay f32, as llama.cpp expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from openllm import __version__
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import Tokenizer
from openllm.data.tokenizer.spm import SentencePieceTokenizer
from openllm.model.config import ModelConfig

GGUF_DTYPES = ("f16", "f32")

# our (= Hugging Face's) names -> llama.cpp's, per layer and for the rest
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def check_exportable(config: ModelConfig, tokenizer: Tokenizer) -> None:
    if config.arch != "llama":
        raise OpenLLMError(
            f"GGUF export needs an arch llama model; this one is arch {config.arch} (export it with --format hf)"
        )
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise OpenLLMError(
            f"GGUF export needs a SentencePiece tokenizer; this model's is {tokenizer.describe()} "
            "(export it with --format hf)"
        )


def interleave_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) to interleaved pairs."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path, state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer, dtype: str, name: str
) -> None:
    import gguf

    check_exportable(config, tokenizer)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    arch = "qwen3" if config.qk_norm else "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_string("openllm.version", __version__)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    _add_sentencepiece(writer, tokenizer, gguf)

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
        if arch == "llama" and key.endswith("q_proj.weight"):
            t = interleave_halves(t, config.n_head)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            t = interleave_halves(t, config.kv_heads)
        array = t.numpy()
        writer.add_tensor(target, array.astype(np.float16) if dtype == "f16" and array.ndim == 2 else array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_sentencepiece(writer, tokenizer: SentencePieceTokenizer, gguf) -> None:  # type: ignore[no-untyped-def]
    sp = tokenizer.sp
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = tokenizer.special
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if getattr(special, role) is not None:
            add(getattr(special, role))
    writer.add_add_bos_token(special.add_bos)
    writer.add_add_eos_token(False)
    # SentencePiece's dummy prefix: "a" encodes as "▁a" when the model adds a space before the text
    writer.add_add_space_prefix(sp.encode("a", out_type=str)[:1] == ["\u2581a"])
