"""Any OpenLLM tokenizer as a Hugging Face ``tokenizer.json`` and ``tokenizer_config.json`` that
``AutoTokenizer`` loads with the same ids and the same decoding (see tests/test_tokenizers.py)."""

from __future__ import annotations

from openllm.data.tokenizer import Tokenizer
from openllm.data.tokenizer.hf import HFTokenizer
from openllm.data.tokenizer.spm import SentencePieceTokenizer


def hf_tokenizer_json(tok: Tokenizer) -> str:
    if isinstance(tok, HFTokenizer):
        return tok.raw.to_str()
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece_json(tok)
    raise TypeError(f"no tokenizer.json conversion for {type(tok).__name__}")


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """``tokenizer_config.json`` for the exported ``tokenizer.json`` (a fast tokenizer either way)."""
    return {**tok.config(model_max_length), "tokenizer_class": "PreTrainedTokenizerFast"}


def _sentencepiece_json(tok: SentencePieceTokenizer) -> str:
    """The SentencePiece BPE model as a ``tokenizers`` BPE with byte fallback that yields the same ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as HFRaw
    from tokenizers import decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(tok.model_bytes)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal_type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL  # type: ignore[attr-defined]
    normal = {p.piece for p in proto.pieces if p.type == normal_type}
    # SentencePiece BPE merges pieces in the order of the merged piece's score, i.e. its id.
    merges = sorted(
        (vocab[p], vocab[p[:i]], vocab[p[i:]], p[:i], p[i:])
        for p in normal
        for i in range(1, len(p))
        if p[:i] in normal and p[i:] in normal
    )
    sp = tok.special
    unk = tok.id_to_piece(sp.unk) if sp.unk is not None else None
    hf = HFRaw(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for *_, a, b in merges],
            unk_token=unk,
            byte_fallback=proto.trainer_spec.byte_fallback,
            fuse_unk=True,
        )
    )
    spec = proto.normalizer_spec
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])
    )
    # the control pieces (bos, eos, pad, chat tokens) and unk: each one token that text never produces
    hf.add_special_tokens([p for p, _ in sorted(tok.special_pieces().items(), key=lambda e: e[1])])
    if sp.add_bos and sp.bos is not None:
        bos = tok.id_to_piece(sp.bos)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos)]
        )
    return hf.to_str()
