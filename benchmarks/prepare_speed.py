"""How fast `openllm prepare` turns text into token files, and in how much memory, against the raw
SentencePiece encode rate of the same tokenizer on the same text (measured in the same run), and each
tokenizer type end to end (tokenizer training included) side by side.

    python benchmarks/prepare_speed.py                      # a 100 MB corpus, 1 and N workers, each type
    python benchmarks/prepare_speed.py --size-mb 2000 --skip-single   # the 2 GB memory check
    python benchmarks/prepare_speed.py --write              # also record the figures in docs/benchmarks.md

The corpus is synthetic but real-looking: sentences of ../shared/data (SQuAD passages and Shakespeare)
recombined into unique paragraphs with a fixed seed, so every run measures the same text.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build_corpus(path: Path, size: int) -> int:
    sources = [SHARED / "squad_passages.txt", SHARED / "tinyshakespeare.txt"]
    text = " ".join(p.read_text(encoding="utf-8") for p in sources if p.is_file())
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if len(s.strip()) > 3]
    rng = random.Random(1234)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            para = ". ".join(rng.choice(sentences) for _ in range(rng.randint(2, 12))) + ".\n\n"
            f.write(para)
            written += len(para.encode("utf-8"))
    return written


def run_prepare(
    corpus: Path,
    out: Path,
    workers: int,
    vocab: int,
    tokenizer: Path | None,
    kind: str = "sentencepiece",
    source: Path | None = None,
) -> dict:
    """One `openllm prepare` process; its wall time, the peak memory of its whole process tree (its own RSS
    plus the unique memory of each worker, so that pages a forked worker shares with it count once), and
    its meta."""
    args = [
        sys.executable,
        "-m",
        "openllm",
        "prepare",
        "--input",
        str(corpus),
        "--output-dir",
        str(out),
        "--workers",
        str(workers),
        "--force",
    ]
    args += ["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", str(vocab), "--tokenizer-type", kind]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None  # another version's code
    proc = psutil.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        try:
            workers = proc.children(recursive=True)
            peak = max(peak, proc.memory_info().rss + sum(w.memory_full_info().uss for w in workers))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed with {workers} workers")
    meta = json.loads((out / "meta.json").read_text())
    return {"wall": wall, "peak_rss": peak, "meta": meta, "summary": proc.stdout.read().strip()}


def _encode(args: tuple[str, list[str]]) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args[0])
    return sum(len(ids) for ids in sp.encode(args[1], num_threads=1))


def raw_encode_rate(model: Path, corpus: Path, workers: int, limit: int) -> tuple[float, float]:
    """MB/s of SentencePiece encoding the corpus's paragraphs (up to ``limit`` bytes) in 1 and ``workers``
    processes; reading and splitting the text are not timed."""
    from openllm.data.corpus import split_documents

    with open(corpus, encoding="utf-8") as f:
        docs = split_documents(f.read(limit))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    t0 = time.perf_counter()
    _encode((str(model), docs))
    one = mb / (time.perf_counter() - t0)
    parts = [(str(model), docs[i::workers]) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_encode, [(str(model), ["warm"])] * workers)  # start the processes before timing
        t0 = time.perf_counter()
        pool.map(_encode, parts)
        many = mb / (time.perf_counter() - t0)
    return one, many


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--skip-single", action="store_true", help="only the N-worker run (for very large corpora)")
    p.add_argument(
        "--tokenizer-types",
        default="sentencepiece,tiktoken-bpe",
        help="comma-separated: each runs end to end with N workers (the first is the baseline of the ratios)",
    )
    p.add_argument(
        "--previous",
        type=Path,
        help="the src/ of another version (e.g. `git worktree add /tmp/prev HEAD~3`): its default path as a row",
    )
    p.add_argument("--raw-limit-mb", type=float, default=30, help="text the raw encode rate is measured on")
    p.add_argument("--work-dir", default=None, help="where the corpus and outputs go (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="record the figures in docs/benchmarks.md")
    a = p.parse_args()

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="openllm-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{a.size_mb:g}mb.txt"
    if not corpus.is_file():
        t0 = time.perf_counter()
        build_corpus(corpus, int(a.size_mb * 1e6))
        print(f"built {corpus} in {time.perf_counter() - t0:.1f} s")
    size_mb = corpus.stat().st_size / 1e6

    kinds = a.tokenizer_types.split(",")
    by_kind = {"sentencepiece": run_prepare(corpus, work / "out-n", a.workers, a.vocab_size, None)}
    for kind in kinds:
        if kind not in by_kind:
            by_kind[kind] = run_prepare(corpus, work / f"out-{kind}", a.workers, a.vocab_size, None, kind)
    if a.previous:
        by_kind["previous version (sentencepiece)"] = run_prepare(
            corpus, work / "out-prev", a.workers, a.vocab_size, None, source=a.previous.resolve()
        )
        kinds.insert(0, "previous version (sentencepiece)")
    many = by_kind["sentencepiece"]
    m = many["meta"]
    tok_s = m["timing"]["tokenizer_seconds"]
    rows = [(f"{a.workers} workers (tokenizer trained)", many)]
    one = None
    if not a.skip_single:
        one = run_prepare(corpus, work / "out-1", 1, a.vocab_size, work / "out-n")
        rows.append(("1 worker (same tokenizer)", one))
        again = run_prepare(corpus, work / "out-n2", a.workers, a.vocab_size, work / "out-n")
        rows.append((f"{a.workers} workers (same tokenizer)", again))
    raw_one, raw_many = raw_encode_rate(
        work / "out-n" / "tokenizer.model", corpus, a.workers, int(a.raw_limit_mb * 1e6)
    )

    lines = [
        f"corpus: {size_mb:,.1f} MB, {m['documents_read']:,} documents ({m['duplicates_dropped']:,} duplicates), "
        f"vocab {m['vocab_size']:,}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"tokenizer training: {tok_s:.1f} s on a {m['tokenizer_source'].split('of ')[1].split(' bytes')[0]}-byte sample",
        f"raw SentencePiece encode: {raw_one:.2f} MB/s in 1 process, {raw_many:.2f} MB/s in {a.workers}",
        "",
        "| run | wall s | MB/s end to end (tokenizer training excluded) | x raw rate (same process count) "
        "| peak RSS, process tree |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        t = r["wall"] - (r["meta"]["timing"]["tokenizer_seconds"] if "trained" in name else 0.0)
        rate = size_mb / t
        raw = raw_one if name.startswith("1 worker") else raw_many
        lines.append(f"| {name} | {r['wall']:.1f} | {rate:.2f} | {rate / raw:.2f}x | {r['peak_rss'] / 1e6:,.0f} MB |")
    fingerprints = {r["meta"]["fingerprint"] for _, r in rows}
    lines.append("")
    lines.append(
        f"output identical for every run: {'yes' if len(fingerprints) == 1 else 'NO'} "
        f"(fingerprint {next(iter(fingerprints))[:16]}...)"
    )
    base = size_mb / by_kind[kinds[0]]["wall"]
    lines += [
        "",
        f"Each tokenizer type, {a.workers} workers, tokenizer trained (everything included):",
        "",
        "| --tokenizer-type | wall s | MB/s end to end, training included | x "
        f"{kinds[0]} | tokenizer training s | tokens | peak RSS, process tree |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in kinds:
        r = by_kind[kind]
        rate = size_mb / r["wall"]
        lines.append(
            f"| {kind} | {r['wall']:.1f} | {rate:.2f} | {rate / base:.2f}x | "
            f"{r['meta']['timing']['tokenizer_seconds']:.1f} | {r['meta']['train_tokens'] + r['meta']['val_tokens']:,} "
            f"| {r['peak_rss'] / 1e6:,.0f} MB |"
        )
    report = "\n".join(lines)
    print(report)
    if a.write:
        from report import write_section

        heading = f"Preparing data: `python benchmarks/prepare_speed.py --size-mb {a.size_mb:g}`"
        write_section(ROOT / "docs" / "benchmarks.md", heading, f"## {heading}\n\n{report}\n")


if __name__ == "__main__":
    main()
