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
from openllm.core.extras import require
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
    gguf = require("gguf", "gguf", "GGUF export")

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


# ------------------------------------------------------------------------- reading (inspect, verify)

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """A file named ``*.gguf`` or starting with GGUF's magic bytes."""
    if path.suffix == ".gguf":
        return path.is_file()
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: Path):  # type: ignore[no-untyped-def]
    """A GGUF file's reader (header, metadata and tensor index; the data stays on disk), or one clear error."""
    gguf = require("gguf", "gguf", "reading a GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError... on a damaged file, never its own type
        raise OpenLLMError(f"{path} is truncated or not a GGUF file ({exc})") from None


def gguf_metadata(reader) -> dict:  # type: ignore[no-untyped-def]
    """The file's metadata by key: numbers and strings as they are, arrays (tokens, scores) as their length."""
    from gguf import GGUFValueType

    meta: dict = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            meta[key] = len(field.data)
        elif field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            meta[key] = field.parts[field.data[0]][0].item()
    return meta


def gguf_problems(reader, meta: dict) -> list[str]:  # type: ignore[no-untyped-def]
    """What keeps a GGUF file of the architectures we write (llama, qwen3) from being a whole model: every
    tensor llama.cpp needs is there and the embedding fits the vocabulary (empty: it is). A file of another
    architecture is only checked to be readable. GGUF carries no checksum, so changed values go unseen."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen3"):
        return []
    layers, width, vocab = (
        meta.get(k) for k in (f"{arch}.block_count", f"{arch}.embedding_length", "tokenizer.ggml.tokens")
    )
    if not (isinstance(layers, int) and isinstance(width, int) and isinstance(vocab, int)):
        return [f"its metadata lacks {arch}.block_count, {arch}.embedding_length or tokenizer.ggml.tokens"]
    tensors = {t.name: t for t in reader.tensors}
    if not 0 < layers <= len(tensors):  # checked before a list of names that long is made
        return [f"{arch}.block_count is {layers:,}; the file holds {len(tensors)} tensors"]
    qk_norm = ("attn_q_norm.weight", "attn_k_norm.weight")  # qwen3 only
    per_layer = [v for v in LAYER_TENSORS.values() if arch == "qwen3" or v not in qk_norm]
    want = [*MODEL_TENSORS.values(), *(f"blk.{i}.{v}" for i in range(layers) for v in per_layer)]
    problems = []
    missing = [name for name in want if name not in tensors]
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        problems.append(f"lacks {len(missing)} of the {len(want)} tensors it needs ({', '.join(missing[:3])}{more})")
    embd = tensors.get("token_embd.weight")
    if embd is not None and [int(n) for n in embd.shape] != [width, vocab]:
        problems.append(
            f"token_embd.weight has shape {[int(n) for n in embd.shape]}, the metadata needs {[width, vocab]}"
        )
    return problems
