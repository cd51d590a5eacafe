#!/usr/bin/env python3
"""How well `openllm prepare --near-dedup` finds near-copies, and what it costs per MB.

    python benchmarks/near_dedup.py [--copies 1500] [--output docs/benchmarks.md | -] [--smoke]

The corpus: the unique SQuAD passages of ../shared/data (real Wikipedia text), followed by near-copies of
some of them planted with a fixed seed: a few words edited (1% or 3% of them), the lines wrapped elsewhere,
boilerplate put around the text, or many words edited (10%: no longer a near-copy at the default 0.8). The
truth is the exact Jaccard similarity of a copy's word 5-gram set with its source's. Recall is the share of
copies at or above the threshold that are dropped, the false-drop rate the share of the rest (copies below it,
and the originals) that are. The documents go through the same index `prepare` uses, in the same order; the
cost is `prepare` itself with and without `--near-dedup`, in the same run, on the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import processor, publish  # noqa: E402

SQUAD = ROOT.parent / "shared" / "data" / "squad_passages.txt"
KINDS = ("1% of words edited", "3% of words edited", "lines rewrapped", "boilerplate added", "10% of words edited")


def shingles(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def plant(doc: str, kind: str, r: random.Random) -> str:
    words = doc.split()
    share = {"1% of words edited": 0.01, "3% of words edited": 0.03, "10% of words edited": 0.10}.get(kind)
    if share is not None:
        for j in r.sample(range(len(words)), max(1, round(len(words) * share))):
            words[j] = r.choice(["the", "a", "of", "and", "new", "old"]) if words[j].isalpha() else words[j] + "x"
        return " ".join(words)
    if kind == "lines rewrapped":
        lines, k = [], 0
        while k < len(words):
            step = r.randint(5, 12)
            lines.append(" ".join(words[k : k + step]))
            k += step
        return "\n".join(lines)
    return f"Home | News | Contact\nPosted {r.randint(1, 28)} May 2024.\n{doc}\nShare this article. Comments (0)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=1500, help="near-copies planted")
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="'-': print only")
    ap.add_argument("--smoke", action="store_true", help="a few documents, nothing written")
    a = ap.parse_args()
    from openllm.data.corpus import normalize_document as normalize
    from openllm.data.neardup import NearDedup, NearDuplicateIndex
    from openllm.data.prepare import prepare_dataset

    originals = list(dict.fromkeys(p.strip() for p in SQUAD.read_text(encoding="utf-8").split("\n\n") if p.strip()))
    n_copies = 40 if a.smoke else a.copies
    originals = originals[:200] if a.smoke else originals
    r = random.Random(7)
    planted = []  # (kind, text, true similarity with its source)
    for i in r.sample(range(len(originals)), n_copies):
        kind = KINDS[len(planted) % len(KINDS)]
        text = plant(originals[i], kind, r)
        planted.append((kind, text, jaccard(normalize(originals[i]), normalize(text))))
    docs = originals + [t for _, t, _ in planted]
    work = Path(tempfile.mkdtemp(prefix="near-dedup-"))
    try:
        settings = NearDedup()
        index = NearDuplicateIndex(work / "index.sqlite", settings)
        t0 = time.perf_counter()
        dropped = [index.is_near_duplicate(normalize(d)) for d in docs]
        index_seconds = time.perf_counter() - t0
        index.close()
        corpus = work / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        mb = corpus.stat().st_size / 1e6
        times, counts = {}, (0, 0)
        for near in (False, True):
            t0 = time.perf_counter()
            vocab = 500 if a.smoke else 2000
            ds = prepare_dataset([corpus], work / f"out-{near}", vocab_size=vocab, near_dedup=near, workers=2)
            times[near] = time.perf_counter() - t0
            if near:
                counts = ds.meta["near_duplicates_dropped"], ds.meta["duplicates_dropped"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    thr = settings.threshold
    copies = dropped[len(originals) :]
    near_copies = [d for d, (_, _, j) in zip(copies, planted, strict=True) if j >= thr]
    far = [d for d, (_, _, j) in zip(copies, planted, strict=True) if j < thr] + dropped[: len(originals)]
    bands, rows = settings.bands_rows()
    lines = [
        "## Near-duplicate removal: `python benchmarks/near_dedup.py`",
        "",
        f"`python benchmarks/near_dedup.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + f" on {processor()}: "
        f"{len(originals):,} unique SQuAD passages and {n_copies:,} planted copies ({mb:.1f} MB), MinHash with "
        f"{settings.permutations} permutations in {bands} bands of {rows}, word {settings.shingle}-grams, "
        f"threshold {thr}.",
        "",
        "| planted copies | count | true similarity (min-max) | dropped |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        picked = [(d, j) for d, (k, _, j) in zip(copies, planted, strict=True) if k == kind]
        sims = [j for _, j in picked]
        share = sum(d for d, _ in picked) / len(picked)
        lines.append(f"| {kind} | {len(picked)} | {min(sims):.2f}-{max(sims):.2f} | {share:.1%} |")
    lines += [
        "",
        f"Recall (copies at similarity >= {thr} dropped): {sum(near_copies) / max(len(near_copies), 1):.1%} of "
        f"{len(near_copies):,}; false drops (originals and copies below {thr}): {sum(far):,} of {len(far):,}; "
        f"precision {sum(near_copies) / max(sum(dropped), 1):.1%}.",
        "",
        f"Cost: the index alone {index_seconds:.2f} s ({mb / index_seconds:.1f} MB/s); `prepare` end to end "
        f"{times[False]:.2f} s without and {times[True]:.2f} s with `--near-dedup` (x{times[True] / times[False]:.2f}, "
        f"{(times[True] - times[False]) / mb:.2f} s more per MB). `prepare` dropped {counts[0]:,} near-duplicates "
        f"and {counts[1]:,} exact ones (copies that came out identical to another): "
        + ("as many as the index alone" if sum(counts) == sum(dropped) else f"the index alone dropped {sum(dropped):,}")
        + ".",
    ]
    if a.smoke or a.output == "-":
        print("\n".join(lines))
    else:
        publish(a.output, "Near-duplicate removal", lines)


if __name__ == "__main__":
    main()
