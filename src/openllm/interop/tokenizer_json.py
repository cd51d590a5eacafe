"""A SentencePiece BPE model as a Hugging Face ``tokenizer.json`` that yields the same ids."""

from __future__ import annotations

from openllm.data.tokenizer import BOS_ID, SPECIAL_TOKENS, Tokenizer


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """The SentencePiece model as a `tokenizers` BPE that yields the same ids (see tests/test_export.py)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as HFTokenizer
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
    hf = HFTokenizer(
        models.BPE(
            vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>", byte_fallback=True, fuse_unk=True
        )
    )
    spec = proto.normalizer_spec
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])
    )
    hf.add_special_tokens([SPECIAL_TOKENS[k] for k in ("pad_token", "unk_token", "bos_token", "eos_token")])
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return hf.to_str()
