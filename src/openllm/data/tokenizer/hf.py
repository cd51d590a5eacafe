"""The Hugging Face ``tokenizers`` backend (``tokenizer.json``): GPT-2 style byte-level BPE (trained
here, or read from a ``tokenizer.json`` or a ``vocab.json`` + ``merges.txt`` pair) and character
vocabularies such as nanoGPT's.

Which tokens are bos, eos, pad and unk comes from ``tokenizer_config.json`` beside the tokenizer
(the file ``transformers`` writes and reads), then from the model's ``config.json`` ids, and only
without either from the conventional names (``<|endoftext|>``, ``<s>``, ``</s>``, ``<pad>``,
``<unk>``) among the tokenizer's special tokens. Whether a document starts with bos is what the
tokenizer's own post-processor does, so prompts are encoded as ``transformers`` encodes them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from openllm.core.errors import OpenLLMError, first_line
from openllm.core.fileio import atomic_write_text
from openllm.data.tokenizer.base import CHAT_TOKENS, ROLES, SpecialTokens, Tokenizer, read_chat_template

JSON_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
CONVENTIONAL = {
    "bos": ("<s>", "<|begin_of_text|>", END_OF_TEXT),
    "eos": ("</s>", "<|end_of_text|>", END_OF_TEXT),
    "pad": ("<pad>",),
    "unk": ("<unk>",),
}


class HFTokenizer(Tokenizer):
    kind = "huggingface"
    config_class = "PreTrainedTokenizerFast"

    def __init__(
        self,
        raw: RawTokenizer,
        tokenizer_config: dict | None = None,
        model_config: dict | None = None,
        origin: str = "",
    ):
        self.raw, self.origin = raw, origin
        with _rust_failures(origin, "encode"):  # it encodes a probe text
            self.special = _special_tokens(raw, tokenizer_config, model_config)
        self.chat_template = read_chat_template((tokenizer_config or {}).get("chat_template"))
        self._markup = self.special.ids()
        # ``tokenizers`` turns an added token's string in the text into its id; a chat token's must stay text
        self._literal = [t for t in CHAT_TOKENS if raw.token_to_id(t) is not None]
        spec = json.loads(raw.to_str())
        model = spec.get("model") or {}
        self.model_type = model.get("type", "?")
        self.byte_level = _uses(spec.get("pre_tokenizer"), "ByteLevel")
        # A BPE that has neither an unknown token nor a byte fallback silently drops characters it has no
        # token for; for such a vocabulary without normalizer or pre-tokenizer (a character vocabulary)
        # the characters it can encode are known, and any other character is refused by name.
        drops = model.get("type") == "BPE" and model.get("unk_token") is None and not model.get("byte_fallback")
        plain = spec.get("normalizer") is None and spec.get("pre_tokenizer") is None
        self.alphabet = {t for t in raw.get_vocab() if len(t) == 1} if drops and plain else None

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size(with_added_tokens=True)

    def identity_bytes(self) -> bytes:
        return json.dumps(
            {"tokenizer.json": self.raw.to_str(), "special": asdict(self.special)}, sort_keys=True
        ).encode()

    def _check(self, text: str) -> None:
        if self.alphabet is not None and not set(text) <= self.alphabet:
            c = min(set(text) - self.alphabet)
            raise OpenLLMError(
                f"the character {c!r} (U+{ord(c):04X}) is not in the tokenizer's vocabulary "
                f"({self.describe()}); the text cannot be encoded without losing it"
            )

    @cached_property
    def _as_text(self) -> RawTokenizer:
        """A copy that encodes every string as text, special tokens' included."""
        raw = RawTokenizer.from_str(self.raw.to_str())
        raw.encode_special_tokens = True
        return raw

    def _encoder(self, text: str) -> RawTokenizer:
        return self._as_text if any(t in text for t in self._literal) else self.raw

    def encode(self, text: str) -> list[int]:
        self._check(text)
        with _rust_failures(self.origin, "encode"):
            return self._encoder(text).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        for t in texts:
            self._check(t)
        if any(self._encoder(t) is not self.raw for t in texts):
            return [self.encode(t) for t in texts]
        with _rust_failures(self.origin, "encode"):
            return [e.ids for e in self.raw.encode_batch(list(texts), add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        self._check(text)
        with _rust_failures(self.origin, "encode"):
            e = self._as_text.encode(text, add_special_tokens=False)
        return e.ids, list(e.offsets)

    def special_pieces(self) -> dict[str, int]:
        # (transformers splits every added token out of a rendered template, special or not)
        return {t.content: i for i, t in self.raw.get_added_tokens_decoder().items()}

    def with_chat_tokens(self, template: str) -> HFTokenizer:
        if self.alphabet is not None:
            raise OpenLLMError(
                f"the tokenizer ({self.describe()}) is a character vocabulary: it has no special tokens and cannot "
                "take chat tokens; fine-tune with a byte-level BPE or SentencePiece tokenizer, or give data whose "
                "tokenizer has a chat template"
            )
        raw = RawTokenizer.from_str(self.raw.to_str())
        for t in CHAT_TOKENS:
            i = raw.token_to_id(t)
            if i is not None and i not in self.special_pieces().values():
                raise OpenLLMError(f"the tokenizer has {t!r} as an ordinary token (id {i}); it cannot be a chat token")
        raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
        roles = {f"{r}_token": self.id_to_piece(i) for r in ROLES if (i := getattr(self.special, r)) is not None}
        return HFTokenizer(raw, {**roles, "chat_template": template}, None, self.origin)

    def decode(self, ids: Iterable[int]) -> str:
        with _rust_failures(self.origin, "decode"):
            return self.raw.decode([i for i in map(int, ids) if i not in self._markup], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        piece = self.raw.id_to_token(int(i))
        if piece is None:
            raise OpenLLMError(f"token id {i} is outside the tokenizer's {self.vocab_size} tokens")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.raw.token_to_id(piece)

    def describe(self) -> str:
        if self.alphabet is not None and len(self.alphabet) == self.raw.get_vocab_size(with_added_tokens=False):
            what = "character vocabulary"
        else:
            what = f"{'byte-level ' if self.byte_level else ''}{self.model_type}"
        return f"{what} (Hugging Face tokenizers), {self.vocab_size} tokens"

    def _write_files(self, directory: Path) -> list[str]:
        atomic_write_text(directory / JSON_FILE, self.raw.to_str())
        return [JSON_FILE]


@contextlib.contextmanager
def _rust_failures(origin: str, action: str) -> Iterator[None]:
    """A panic inside ``tokenizers`` as one error naming the tokenizer. The panic comes as pyo3's
    ``PanicException``, a BaseException (not an Exception), e.g. when a regular expression of a hostile
    tokenizer.json's normalizer or pre-tokenizer backtracks past Oniguruma's retry limit on some text. Such
    tokenizers are not refused at load: their patterns are ordinary regular expressions, and which text makes
    one backtrack too much cannot be told in advance; the limit keeps the time each attempt takes bounded."""
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        reason = first_line(exc, "no reason given")[:200]
        name = f"the tokenizer {origin}" if origin else "the tokenizer"
        raise OpenLLMError(f"{name} failed to {action} this text ({reason})") from None


def _uses(component: dict | None, type_name: str) -> bool:
    if not component:
        return False
    if component.get("type") == type_name:
        return True
    return any(_uses(c, type_name) for c in component.get("pretokenizers") or component.get("processors") or [])


def _special_tokens(raw: RawTokenizer, tokenizer_config: dict | None, model_config: dict | None) -> SpecialTokens:
    vocab = raw.get_vocab_size(with_added_tokens=True)

    def token_id(value) -> int | None:
        content = value.get("content") if isinstance(value, dict) else value
        return raw.token_to_id(content) if isinstance(content, str) else None

    found: dict[str, int | None] = {}
    for role in ROLES:
        if tokenizer_config and f"{role}_token" in tokenizer_config:
            found[role] = token_id(tokenizer_config[f"{role}_token"])
    for role in ("bos", "eos", "pad"):
        i = (model_config or {}).get(f"{role}_token_id")
        if role not in found and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab:
            found[role] = i
    if not tokenizer_config:
        specials = {t.content for t in raw.get_added_tokens_decoder().values() if t.special}
        for role, names in CONVENTIONAL.items():
            name = next((n for n in names if n in specials), None)
            if role not in found and name is not None:
                found[role] = raw.token_to_id(name)
    with_markup = raw.encode("a").ids
    plain = raw.encode("a", add_special_tokens=False).ids
    bos = found.get("bos")
    add_bos = bos is not None and len(with_markup) > len(plain) and with_markup[0] == bos
    return SpecialTokens(**{r: found.get(r) for r in ROLES}, add_bos=add_bos)


def read_tokenizer_json(path: Path, tokenizer_config: dict | None, model_config: dict | None) -> HFTokenizer:
    try:
        raw = RawTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise OpenLLMError(f"{path} is not a valid tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
    return HFTokenizer(raw, tokenizer_config, model_config, str(path))


def _byte_level(raw: RawTokenizer) -> RawTokenizer:
    """GPT-2's text handling: bytes mapped to printable characters, no prefix space, nothing added."""
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    return raw


def read_vocab_merges(vocab: Path, merges: Path, tokenizer_config: dict | None, model_config: dict | None):
    """A GPT-2 ``vocab.json`` + ``merges.txt`` pair as one byte-level BPE ``tokenizer.json``."""
    try:
        raw = _byte_level(RawTokenizer(models.BPE.from_file(str(vocab), str(merges))))
    except Exception as exc:
        raise OpenLLMError(
            f"{vocab} and {merges} are not a GPT-2 BPE pair ({str(exc).splitlines()[0][:200]})"
        ) from None
    names = {
        (v.get("content") if isinstance(v, dict) else v)
        for k, v in (tokenizer_config or {}).items()
        if k in {f"{r}_token" for r in ROLES}
    }
    names |= {END_OF_TEXT} if raw.token_to_id(END_OF_TEXT) is not None else set()
    raw.add_special_tokens(sorted(n for n in names if isinstance(n, str) and raw.token_to_id(n) is not None))
    return HFTokenizer(raw, tokenizer_config, model_config, str(vocab))


def character_tokenizer(stoi: dict[str, int]) -> HFTokenizer:
    """A character vocabulary (nanoGPT's ``stoi``): one token per character, no special tokens."""
    raw = RawTokenizer(models.BPE(vocab=dict(stoi), merges=[]))
    raw.decoder = decoders.Fuse()
    return HFTokenizer(raw, {}, {})


def train_bytelevel_bpe(documents: Sequence[str], vocab_size: int) -> HFTokenizer:
    """GPT-2 style byte-level BPE: every byte has a token (no unknowns), ``<|endoftext|>`` ends documents."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise OpenLLMError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {len(alphabet) + 1} "
            "entries (256 bytes and <|endoftext|>)"
        )
    raw = _byte_level(RawTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=alphabet, show_progress=False
    )
    raw.train_from_iterator(documents, trainer=trainer, length=len(documents))
    got = raw.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise OpenLLMError(
            f"the corpus cannot support a vocabulary of {vocab_size} tokens (it has {got} distinct merges and "
            "bytes); use a smaller --vocab-size"
        )
    return HFTokenizer(raw, {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}, None)
