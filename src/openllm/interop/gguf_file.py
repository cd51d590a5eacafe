"""``openllm export --format gguf``: one GGUF file that llama.cpp loads, written with the ``gguf`` package.

The writer here is the same for every architecture: the common metadata, the tokenizer, then the tensors
the architecture's GGUF layout gives (registered with its family in :mod:`openllm.interop.families`:
llama.cpp's architecture name, its own metadata, its tensor names and layout; see ``interop/llama.py``,
``interop/qwen2.py``, ``interop/gpt2.py``). Tokenizers: SentencePiece as llama.cpp's ``llama`` tokenizer
(pieces, scores and token types) and a byte-level BPE with GPT-2's or Llama 3's pre-tokenizer (``tiktoken-bpe``)
as its ``gpt2`` tokenizer (pieces, merges, pre-tokenizer ``gpt-2`` or ``llama-bpe``), each with the special ids
and whether a prompt starts with bos.
Anything else is refused by name rather than written half-right.

Weight matrices are written in f32 or f16; norms and biases stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from openllm import __version__
from openllm.core.errors import OpenLLMError
from openllm.core.extras import require
from openllm.data.chat import end_of_turn_ids
from openllm.data.tokenizer import Tokenizer
from openllm.data.tokenizer.hf import HFTokenizer
from openllm.data.tokenizer.spm import SentencePieceTokenizer
from openllm.data.tokenizer.tiktoken_bpe import PATTERN as LLAMA3_PATTERN
from openllm.interop.families import GGUFLayout, family, gguf_layout_of
from openllm.model.config import ModelConfig

GGUF_DTYPES = ("f16", "f32")


def gguf_layout(config: ModelConfig) -> GGUFLayout:
    """The architecture's GGUF layout (:mod:`openllm.interop.families`), or one error saying why there is none."""
    fam = family(config.arch)
    if fam.gguf is None:
        raise OpenLLMError(f"GGUF export cannot write an arch {config.arch} model: {fam.gguf_refusal}")
    return fam.gguf


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """How llama.cpp holds this tokenizer: ``llama`` (SentencePiece) or ``gpt2`` (a byte-level BPE with GPT-2's or
    Llama 3's pre-tokenizer); anything else is refused by name."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "llama"
    if isinstance(tokenizer, HFTokenizer) and tokenizer.model_type == "BPE" and bytelevel_pre(tokenizer):
        return "gpt2"
    raise OpenLLMError(
        "GGUF export needs a SentencePiece tokenizer or a byte-level BPE with GPT-2's or Llama 3's pre-tokenizer; "
        f"this model's is {tokenizer.describe()} (export it with --format hf)"
    )


def bytelevel_pre(tokenizer: HFTokenizer) -> str | None:
    """llama.cpp's name for a byte-level BPE's text split: ``gpt-2`` (GPT-2's regex, bytes as printable characters,
    no prefix space) or ``llama-bpe`` (Llama 3's regex as a Split, then bytes as printable characters: the
    tiktoken-bpe tokenizers' split; llama.cpp then takes a piece that is one token whole, as tiktoken does);
    None for any other."""
    spec = json.loads(tokenizer.raw.to_str())
    pre = spec.get("pre_tokenizer") or {}
    ignores_merges = bool((spec.get("model") or {}).get("ignore_merges"))
    if spec.get("normalizer") is not None:
        return None
    gpt2 = (
        pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True and pre.get("add_prefix_space") is False
    )
    if gpt2:  # (llama.cpp's gpt-2 applies every merge; its llama-bpe takes a piece that is one token whole)
        return None if ignores_merges else "gpt-2"
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_PATTERN
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex") is False
        and steps[1].get("add_prefix_space") is False
        and ignores_merges
    ):
        return "llama-bpe"
    return None


def check_exportable(config: ModelConfig, tokenizer: Tokenizer) -> None:
    gguf_layout(config)
    tokenizer_kind(tokenizer)


def interleave_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) to interleaved pairs."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path, state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer, dtype: str, name: str
) -> None:
    gguf = require("gguf", "gguf", "GGUF export")

    layout, kind = gguf_layout(config), tokenizer_kind(tokenizer)
    writer = gguf.GGUFWriter(str(path), layout.arch(config))
    writer.add_name(name)
    writer.add_string("openllm.version", __version__)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_head)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    layout.metadata(writer, config)
    if kind == "llama":
        assert isinstance(tokenizer, SentencePieceTokenizer)
        _add_sentencepiece(writer, tokenizer, gguf)
    else:
        assert isinstance(tokenizer, HFTokenizer)
        _add_bytelevel_bpe(writer, tokenizer, gguf)
    for target, tensor in layout.tensors(state, config):
        array = tensor.detach().to(torch.float32).numpy()
        writer.add_tensor(target, array.astype(np.float16) if dtype == "f16" and array.ndim == 2 else array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_special_ids(writer, tokenizer: Tokenizer) -> None:  # type: ignore[no-untyped-def]
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
    if tokenizer.chat_template:  # the conversation format the model was fine-tuned on, and the end of its turn
        writer.add_chat_template(tokenizer.chat_template)
        turn = sorted(end_of_turn_ids(tokenizer) - {special.eos})
        if turn:
            writer.add_eot_token_id(turn[0])


def _add_bytelevel_bpe(writer, tokenizer: HFTokenizer, gguf) -> None:  # type: ignore[no-untyped-def]
    """A byte-level BPE as llama.cpp's ``gpt2`` tokenizer: the pieces (bytes as GPT-2's printable characters),
    the merges in rank order, special tokens as control tokens, and the pre-tokenizer (:func:`bytelevel_pre`)."""
    spec = json.loads(tokenizer.raw.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in (spec.get("model") or {}).get("merges", [])]
    specials = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")} | tokenizer.special.ids()
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(pieces))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bytelevel_pre(tokenizer) or "gpt-2")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer)


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
    _add_special_ids(writer, tokenizer)
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
    """What keeps a GGUF file of an architecture we write from being a whole model: every tensor llama.cpp
    needs is there and the embedding fits the vocabulary (empty: it is). A file of another architecture is
    only checked to be readable. GGUF carries no checksum, so changed values go unseen."""
    arch = meta.get("general.architecture")
    layout = gguf_layout_of(arch)
    if layout is None:
        return []
    layers, width, vocab = (
        meta.get(k) for k in (f"{arch}.block_count", f"{arch}.embedding_length", "tokenizer.ggml.tokens")
    )
    if not (isinstance(layers, int) and isinstance(width, int) and isinstance(vocab, int)):
        return [f"its metadata lacks {arch}.block_count, {arch}.embedding_length or tokenizer.ggml.tokens"]
    tensors = {t.name: t for t in reader.tensors}
    if not 0 < layers <= len(tensors):  # checked before a list of names that long is made
        return [f"{arch}.block_count is {layers:,}; the file holds {len(tensors)} tensors"]
    want = layout.expected(str(arch), layers)
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
