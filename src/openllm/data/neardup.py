"""Near-duplicate removal for ``openllm prepare --near-dedup``: MinHash over word shingles, LSH bands on disk.

Each document becomes the set of its word n-grams (``shingle`` words, lower-cased, punctuation kept), and its
MinHash signature: for each of ``permutations`` seeded hash functions, the smallest value over the shingles.
Two documents' signatures agree in a share of places that estimates their Jaccard similarity. The signature
is cut into ``bands`` of ``rows`` values, chosen for the threshold as LSH does, leaning towards recall (with 112
permutations and 0.8: 12 bands of 9, so a pair at similarity 0.88 shares a band with probability 0.99 and one
at 0.5 with 0.02). A document whose band keys meet an earlier kept document's is a candidate; it is a
near-duplicate when their signatures estimate a Jaccard similarity of at least ``threshold``, and is then
dropped. Otherwise its band keys and signature are stored.

The index lives in an SQLite file in the preparation's spool directory (a bounded page cache, the rest on
disk: about 600 bytes per kept document), so memory does not grow with the corpus. The hash functions are
seeded, so the same inputs in the same order with the same seed drop the same documents. The MinHash and
banding are written here (a few lines of NumPy) rather than taken from ``datasketch``, whose LSH index is in
memory and whose package needs SciPy.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CACHE_KB = 32 * 1024  # SQLite's page cache: what the index holds in memory at most
BLOCK = 4096  # shingles hashed at once (a 4096 x permutations matrix: 3.7 MB at 112)
COMMIT_EVERY = 4096  # documents added per transaction
WORD_CACHE = 1 << 20  # words whose hashes are kept (about 100 MB at most)


@dataclass(frozen=True)
class NearDedup:
    """The settings (``meta.json`` records them, with the bands and rows chosen)."""

    threshold: float = 0.8
    permutations: int = 112
    shingle: int = 5
    seed: int = 1337

    def bands_rows(self) -> tuple[int, int]:
        return lsh_bands(self.threshold, self.permutations)

    def describe(self) -> dict:
        bands, rows = self.bands_rows()
        return {**asdict(self), "bands": bands, "rows": rows}


def lsh_bands(threshold: float, permutations: int) -> tuple[int, int]:
    """(bands, rows), bands x rows <= permutations, whose collision curve 1 - (1 - s^r)^b best separates
    similarities above ``threshold`` from those below, a missed near-copy weighing nine times a false candidate:
    every candidate is checked on the signatures, so a false one costs only that comparison."""
    s = np.linspace(0.0, 1.0, 1001)
    best: tuple[float, int, int] | None = None
    for rows in range(1, permutations + 1):
        bands = permutations // rows
        p = 1 - (1 - s**rows) ** bands
        error = float(np.mean(np.where(s < threshold, 0.1 * p, 0.9 * (1 - p))))  # the two areas, weighted
        if best is None or error < best[0]:
            best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


class NearDuplicateIndex:
    """The kept documents' band keys and signatures, in an SQLite file; :meth:`is_near_duplicate` checks a
    document against them and adds it when it is new."""

    def __init__(self, path: Path, settings: NearDedup):
        self.settings = settings
        self.bands, self.rows = settings.bands_rows()
        rng = np.random.default_rng(settings.seed)
        self.a = rng.integers(0, 1 << 64, settings.permutations, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, settings.permutations, dtype=np.uint64, endpoint=False)
        self.key = hashlib.blake2b(str(settings.seed).encode(), digest_size=16).digest()
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions begun and committed here
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KB}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE bands (key INTEGER NOT NULL, doc INTEGER NOT NULL)")
        self.db.execute("CREATE INDEX band_key ON bands (key)")
        self.db.execute("CREATE TABLE signatures (doc INTEGER PRIMARY KEY, sig BLOB NOT NULL)")
        self.db.execute("BEGIN")  # one transaction per COMMIT_EVERY documents: a commit per insert is slow
        self.kept = 0
        self.words: dict[str, int] = {}  # word -> its keyed hash (words repeat: most are looked up, not hashed)

    def signature(self, text: str) -> np.ndarray:
        """The document's MinHash signature (``permutations`` values below 2**32)."""
        words = text.lower().split()
        cache = self.words  # word -> its keyed hash: words repeat, so most are looked up (at C speed), not hashed
        missing = set(words).difference(cache)
        if len(cache) + len(missing) > WORD_CACHE:
            cache.clear()
            missing = set(words)
        for w in missing:
            cache[w] = int.from_bytes(
                hashlib.blake2b(w.encode("utf-8"), digest_size=8, key=self.key).digest(), "little"
            )
        ids = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
        n = self.settings.shingle
        with np.errstate(over="ignore"):  # (products wrap at 2**64 by design)
            if len(ids) > n:  # each shingle: its words' hashes mixed in order (multiply-add)
                mixed = ids[: len(ids) - n + 1].copy()
                for j in range(1, n):
                    mixed = mixed * np.uint64(0x9E3779B97F4A7C15) + ids[j : len(ids) - n + 1 + j]
            else:  # a document shorter than a shingle is one shingle
                digest = hashlib.blake2b(ids.tobytes(), digest_size=8).digest()
                mixed = np.array([int.from_bytes(digest, "little")], dtype=np.uint64)
            hashes = np.unique(mixed >> np.uint64(32))  # 32-bit shingle hashes, each once
            # multiply-add-shift hashing (Dietzfelbinger): ((a h + b) mod 2**64) >> 32, a odd; a block of
            # shingles at a time, so that a long document's matrix stays small (BLOCK x permutations)
            sig = np.full(self.settings.permutations, np.iinfo(np.uint64).max, dtype=np.uint64)
            for i in range(0, len(hashes), BLOCK):
                part = (hashes[i : i + BLOCK, None] * self.a + self.b) >> np.uint64(32)
                np.minimum(sig, part.min(axis=0), out=sig)
            return sig.astype(np.uint32)

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        keys = []
        for band in range(self.bands):
            part = sig[band * self.rows : (band + 1) * self.rows].tobytes() + band.to_bytes(2, "little")
            keys.append(int.from_bytes(hashlib.blake2b(part, digest_size=8).digest(), "little", signed=True))
        return keys

    def is_near_duplicate(self, text: str) -> bool:
        """True when ``text`` is a near-copy of a document kept before; else it is kept (added) and False."""
        return self.is_near_duplicate_signature(self.signature(text))

    def is_near_duplicate_signature(self, sig: np.ndarray) -> bool:
        """:meth:`is_near_duplicate` of a document's :meth:`signature` (`prepare merge` has the parts' ones)."""
        keys = self._band_keys(sig)
        marks = ",".join("?" * len(keys))
        candidates = [row[0] for row in self.db.execute(f"SELECT DISTINCT doc FROM bands WHERE key IN ({marks})", keys)]
        for doc in candidates:
            (blob,) = self.db.execute("SELECT sig FROM signatures WHERE doc = ?", (doc,)).fetchone()
            if estimated_similarity(np.frombuffer(blob, dtype=np.uint32), sig) >= self.settings.threshold:
                return True
        doc = self.kept
        self.kept += 1
        self.db.executemany("INSERT INTO bands VALUES (?, ?)", [(k, doc) for k in keys])
        self.db.execute("INSERT INTO signatures VALUES (?, ?)", (doc, sig.tobytes()))
        if self.kept % COMMIT_EVERY == 0:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
        return False

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


def estimated_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity two signatures estimate."""
    return float(np.mean(a == b))
