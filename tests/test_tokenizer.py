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


# --- the interface over every backend --------------------------------------------------------------

TEXT = "KING RICHARD:\nA horse! 42 — ünïcødé 漢字 🙂  two  spaces\tand a tab"


@pytest.fixture(scope="module")
def bpe(small_corpus):
    return train_tokenizer(split_documents(read_text(small_corpus)[0]), vocab_size=400, kind="bytelevel-bpe")


def test_bytelevel_bpe_is_gpt2_style_and_lossless(bpe):
    assert bpe.kind == "huggingface" and bpe.vocab_size == 400
    assert bpe.id_to_piece(bpe.eos_id) == "<|endoftext|>" and bpe.pad_id is None and bpe.unk_id is None
    assert not bpe.special.add_bos and bpe.prompt_ids("hi") == bpe.encode("hi")
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT  # every byte has a token: nothing unknown, nothing lost
    assert bpe.encode_document("hello") == [*bpe.encode("hello"), bpe.eos_id]
    assert bpe.decode(bpe.encode_document("hello")) == "hello"  # markup is not text


def test_bytelevel_bpe_training_is_deterministic(small_corpus, bpe):
    again = train_tokenizer(split_documents(read_text(small_corpus)[0]), vocab_size=400, kind="bytelevel-bpe")
    assert again.sha256 == bpe.sha256


def test_each_kind_saves_its_own_files_and_loads_back_identical(tok, bpe, tmp_path):
    for t in (tok, bpe, tok):  # the same directory, kinds alternating: no stale file of the other kind wins
        t.save(tmp_path, model_max_length=64)
        again = load_tokenizer(tmp_path)
        assert (again.kind, again.sha256, again.special) == (t.kind, t.sha256, t.special)
        assert again.encode(TEXT) == t.encode(TEXT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    bpe.save(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").sha256 == bpe.sha256  # the file itself, too


def test_gpt2_vocab_and_merges_pair_is_the_same_tokenizer(bpe, tmp_path):
    bpe.raw.model.save(str(tmp_path))  # writes vocab.json + merges.txt, as GPT-2 ships them
    pair = load_tokenizer(tmp_path / "vocab.json")
    assert pair.vocab_size == bpe.vocab_size and pair.eos_id == bpe.eos_id
    assert pair.encode(TEXT) == bpe.encode(TEXT) and pair.decode(bpe.encode(TEXT)) == TEXT
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(OpenLLMError, match="needs merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")


def test_special_ids_come_from_the_tokenizer_not_constants(small_corpus, tmp_path):
    """A Llama-style SentencePiece model (unk 0, bos 1, eos 2, no pad) keeps its own ids everywhere."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(split_documents(read_text(small_corpus)[0])),
        model_writer=buf,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    llama = load_tokenizer(tmp_path)
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (1, 2, None, 0)
    assert llama.encode_document("hi") == [1, *llama.encode("hi"), 2]
    assert llama.config()["eos_token"] == "</s>" and llama.config()["pad_token_id"] is None


def test_a_character_vocabulary_refuses_what_it_cannot_encode():
    from openllm.data.tokenizer.hf import character_tokenizer

    chars = character_tokenizer({c: i for i, c in enumerate("\n !abc")})
    assert (chars.bos_id, chars.eos_id, chars.pad_id) == (None, None, None)
    assert chars.encode("abc ba!\n") == [3, 4, 5, 1, 4, 3, 2, 0]
    assert chars.decode([3, 4, 5, 1]) == "abc "
    assert chars.encode_document("ab") == [3, 4, 0, 0]  # no eos: the document ends with its separator
    with pytest.raises(OpenLLMError, match=r"'z' \(U\+007A\) is not in the tokenizer's vocabulary"):
        chars.encode("abz")  # a BPE without unk or byte fallback would drop it silently


def test_broken_tokenizer_files_are_one_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(OpenLLMError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpenLLMError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")


# --- tiktoken-bpe: trained with rustbpe, encoded with tiktoken, stored as a tokenizer.json --------------------


@pytest.fixture(scope="module")
def fast_bpe(small_corpus):
    return train_tokenizer(split_documents(read_text(small_corpus)[0]), vocab_size=400, kind="tiktoken-bpe")


ODD_TEXTS = [TEXT, "\n\n\n  x\r\n", "   ", "it's I'LL we'VE 1234567 3.14", "tabs\t\tand\u00a0nbsp", "😀😀 a😀b"]


def test_tiktoken_bpe_is_lossless_and_ends_documents_with_endoftext(fast_bpe):
    assert (fast_bpe.kind, fast_bpe.vocab_size) == ("tiktoken-bpe", 400)
    assert fast_bpe.id_to_piece(fast_bpe.eos_id) == "<|endoftext|>" and fast_bpe.eos_id == 399
    assert not fast_bpe.special.add_bos and fast_bpe.pad_id is None and fast_bpe.unk_id is None
    for text in ODD_TEXTS:
        assert fast_bpe.decode(fast_bpe.encode(text)) == text
    assert fast_bpe.encode_document("hello") == [*fast_bpe.encode("hello"), 399]


def test_tiktoken_and_the_tokenizer_json_give_the_same_ids(fast_bpe, small_corpus):
    """OpenLLM encodes with tiktoken; transformers and everything else read the tokenizer.json: one set of ids."""
    docs = split_documents(read_text(small_corpus)[0])[:300] + ODD_TEXTS
    assert fast_bpe.encode_batch(docs) == [fast_bpe.raw.encode(d, add_special_tokens=False).ids for d in docs]
    assert sum(map(len, fast_bpe.encode_batch(docs))) < 0.6 * sum(len(d.encode()) for d in docs)  # it merged
    spelled = "the end<|endoftext|>again"  # an added token's string: the tokenizer.json's handling, not tiktoken's
    assert fast_bpe.encode(spelled) == fast_bpe.raw.encode(spelled, add_special_tokens=False).ids


def test_tiktoken_bpe_saves_loads_and_takes_chat_tokens_as_its_own_kind(fast_bpe, small_corpus, tmp_path):
    fast_bpe.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path)
    assert (again.kind, again.sha256, again.special) == ("tiktoken-bpe", fast_bpe.sha256, fast_bpe.special)
    assert again.encode(TEXT) == fast_bpe.encode(TEXT)
    trained_again = train_tokenizer(split_documents(read_text(small_corpus)[0]), vocab_size=400, kind="tiktoken-bpe")
    assert trained_again.sha256 == fast_bpe.sha256  # deterministic
    chat = fast_bpe.with_chat_tokens("{{ messages }}")
    assert chat.kind == "tiktoken-bpe" and chat.vocab_size == 402 and chat.encode(TEXT) == fast_bpe.encode(TEXT)
    assert chat.special_pieces()["<|im_end|>"] == 401 and chat.encode("<|im_end|>") != [401]  # text stays text
    with pytest.raises(OpenLLMError, match="at least 257"):
        train_tokenizer(["a b c"] * 3, vocab_size=200, kind="tiktoken-bpe")
    with pytest.raises(OpenLLMError, match="cannot support a vocabulary"):
        train_tokenizer(["tiny corpus of few words"] * 3, vocab_size=5000, kind="tiktoken-bpe")


def test_tiktoken_bpe_is_llama_cpps_llama_bpe_and_another_split_is_refused(fast_bpe, bpe):
    """GGUF export names the text split llama.cpp must use (checked against llama.cpp by `-m llamacpp`)."""
    from tokenizers import Regex, pre_tokenizers

    from openllm.data.tokenizer.tiktoken_bpe import TiktokenTokenizer
    from openllm.interop.gguf_file import bytelevel_pre, tokenizer_kind

    assert (bytelevel_pre(fast_bpe), bytelevel_pre(bpe)) == ("llama-bpe", "gpt-2")
    assert tokenizer_kind(fast_bpe) == "gpt2"
    other = TiktokenTokenizer.__new__(TiktokenTokenizer)
    other.raw = type(fast_bpe.raw).from_str(fast_bpe.raw.to_str())
    other.raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    assert bytelevel_pre(other) is None


def test_an_empty_prompt_starts_where_a_document_starts_and_generates(tok, bpe, fast_bpe):
    """A tokenizer without bos frames an empty prompt as training frames a document's start: after the end of
    the one before (the closing sample of a bytelevel-bpe or tiktoken-bpe run used to fail on it)."""
    from openllm.data.tokenizer.hf import character_tokenizer
    from openllm.inference.generate import SamplingOptions, generate_ids, generate_text
    from openllm.model import build_model
    from openllm.model.config import ModelConfig

    assert tok.prompt_ids("") == [tok.bos_id] and bpe.prompt_ids("") == [bpe.eos_id]
    assert fast_bpe.prompt_ids("") == [fast_bpe.eos_id]
    chars = character_tokenizer({c: i for i, c in enumerate("ab\n")})
    assert chars.prompt_ids("") == chars.encode("\n\n")
    config = ModelConfig(vocab_size=400, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)
    model, opts = build_model(config), SamplingOptions(max_new_tokens=4, temperature=0)
    assert isinstance(generate_text(model, fast_bpe, "", opts), str)  # (raised inside the model before)
    with pytest.raises(OpenLLMError, match="no tokens to continue from"):  # ids given as they are: refused
        list(generate_ids(model, [], opts))
