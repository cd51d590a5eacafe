"""Quality filters for ``openllm prepare``: each one named, off by default, and counted in ``meta.json``.

They follow the rules web-text pipelines use (Gopher's and C4's heuristics, as datatrove implements them),
kept to the ones that are cheap, language-agnostic and easy to explain:

- ``min_chars`` / ``max_chars``: a document shorter or longer than this many characters (stray headings,
  menus, dumps).
- ``min_alpha_fraction``: a document in which letters are less than this share of its non-space characters
  (tables of numbers, code, markup, encoded data).
- ``max_repeated_lines``: a document in which more than this share of its non-empty lines repeat an earlier
  line of the same document (boilerplate, navigation, spam).
- ``max_repeated_ngrams``: a document in which more than this share of its word 5-grams repeat an earlier one
  (generated or looping text).
- ``languages``: a document whose language, as ``py3langid`` (a maintained fork of langid.py, an optional
  extra) detects it from its first :data:`LANGUAGE_CHARS` characters, is not one of these codes (py3langid's:
  ISO 639-1 mostly). A document without letters is detected as some language all the same (py3langid says
  ``af``): ``--min-alpha-fraction`` is the filter for those.

A document is checked in that order and counted under the first filter it fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

from openllm.core.errors import OpenLLMError
from openllm.core.extras import require

NGRAM = 5  # words per n-gram of max_repeated_ngrams
LANGUAGE_CHARS = 1000  # of each document, for the language detector (enough for it; it costs ~1 ms a document)


@dataclass(frozen=True)
class QualityFilters:
    """The filters asked for; None is off."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_alpha_fraction: float | None = None
    max_repeated_lines: float | None = None
    max_repeated_ngrams: float | None = None
    languages: str | None = None  # comma-separated ISO 639-1 codes

    def active(self) -> dict:
        """The filters that are on, by name (what ``meta.json`` and the dataset's fingerprint record)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __bool__(self) -> bool:
        return bool(self.active())

    def check(self, doc: str) -> str | None:
        """The name of the first filter ``doc`` fails, or None when it passes them all."""
        if self.min_chars is not None and len(doc) < self.min_chars:
            return "min_chars"
        if self.max_chars is not None and len(doc) > self.max_chars:
            return "max_chars"
        if self.min_alpha_fraction is not None:
            visible = sum(not c.isspace() for c in doc)
            if visible == 0 or sum(c.isalpha() for c in doc) < self.min_alpha_fraction * visible:
                return "min_alpha_fraction"
        if (
            self.max_repeated_lines is not None
            and _repeated_share([line.strip() for line in doc.splitlines() if line.strip()]) > self.max_repeated_lines
        ):
            return "max_repeated_lines"
        if self.max_repeated_ngrams is not None:
            words = doc.split()
            grams = [tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
            if _repeated_share(grams) > self.max_repeated_ngrams:
                return "max_repeated_ngrams"
        if self.languages is not None and _detector().classify(doc[:LANGUAGE_CHARS])[0] not in language_codes(
            self.languages
        ):
            return "languages"
        return None


def _repeated_share(items: list) -> float:
    """The share of ``items`` equal to an earlier one (0 for none)."""
    return (len(items) - len(set(items))) / len(items) if items else 0.0


@cache
def _detector():  # type: ignore[no-untyped-def]
    return require("py3langid", "lang", "the --languages filter")


@cache
def language_codes(languages: str) -> frozenset[str]:
    """The codes of ``--languages`` ("en,fr"), each one the detector knows; refused by name otherwise."""
    codes = frozenset(c.strip().lower() for c in languages.split(",") if c.strip())
    known = {code for code, _ in _detector().rank("a")}
    if not codes or (unknown := sorted(codes - known)):
        what = ", ".join(unknown) if codes else "none"
        raise OpenLLMError(
            f"--languages: {what} is not a language code py3langid knows (mostly ISO 639-1, e.g. en,fr; "
            f"{len(known)} known)"
        )
    return codes
