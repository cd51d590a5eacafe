import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.corpus import read_text, split_documents
from openllm.data.tokenizer import load_tokenizer, read_tokenizer_config, train_tokenizer


@pytest.fixture(scope="module")
def tok(small_corpus):
    return train_tokenizer(split_documents(read_text(small_corpus)[0]), vocab_size=400)


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 400
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_round_trip_and_byte_fallback_never_unknown(tok):
    text = "KING RICHARD:\nA horse! 42 — ünïcødé 漢字 🙂"
    ids = tok.encode(text)
    assert 1 not in ids  # unk
    assert tok.decode(ids) == text
    doc = tok.encode_document("hello")
    assert doc[0] == 2 and doc[-1] == 3


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path, model_max_length=128)
    again = load_tokenizer(tmp_path)
    assert again.sha256 == tok.sha256
    assert again.encode("To be, or not to be") == tok.encode("To be, or not to be")
    cfg = read_tokenizer_config(tmp_path)
    assert cfg["eos_token_id"] == 3 and cfg["bos_token_id"] == 2 and cfg["vocab_size"] == 400


def test_vocab_too_large_for_corpus_is_a_clear_error():
    with pytest.raises(OpenLLMError, match="cannot support a vocabulary"):
        train_tokenizer(["tiny corpus of few words"] * 3, vocab_size=5000)


def test_missing_or_invalid_tokenizer_file(tmp_path):
    with pytest.raises(OpenLLMError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(OpenLLMError, match="not a valid SentencePiece"):
        load_tokenizer(bad)
