"""Streaming `openllm prepare`: the same bytes for any number of workers and any input order, the
hash split, bad input refused cleanly, a killed run leaving no partial dataset, bounded memory."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.prepare import prepare_dataset
from tests.conftest import cli, small_args


def decoded_documents(ds, split: str) -> list[str]:
    """A split's documents, decoded back from the packed stream (SentencePiece: bos ... eos)."""
    tok = ds.tokenizer
    ids = np.asarray(getattr(ds, split))
    starts, ends = np.flatnonzero(ids == tok.bos_id), np.flatnonzero(ids == tok.eos_id)
    return [tok.decode(ids[b + 1 : e]) for b, e in zip(starts, ends, strict=True)]


@pytest.fixture(scope="module")
def mixed_inputs(small_corpus, tmp_path_factory):
    """The small corpus spread over a text file, a gzipped JSON-lines file and a directory, with
    duplicates across files."""
    root = tmp_path_factory.mktemp("mixed")
    paras = [p for p in small_corpus.read_text().split("\n\n") if p.strip()]
    (root / "a.txt").write_text("\n\n".join(paras[:150]))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for p in paras[150:300] + paras[:20]:  # 20 duplicates of a.txt's first documents
            f.write(json.dumps({"text": p}) + "\n")
    (root / "dir").mkdir()
    (root / "dir" / "c.txt").write_text("\n\n".join(paras[300:] + paras[140:150]))
    return root, [root / "a.txt", root / "b.jsonl.gz", root / "dir"]


def test_output_is_byte_identical_for_1_and_3_workers_and_reruns(mixed_inputs, tmp_path):
    _, inputs = mixed_inputs
    runs = [prepare_dataset(inputs, tmp_path / f"w{w}", vocab_size=400, workers=w) for w in (1, 3, 3)]
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        assert len({(r.path / name).read_bytes() for r in runs}) == 1, name
    assert len({r.fingerprint for r in runs}) == 1
    meta = runs[0].meta
    assert meta["duplicates_dropped"] == 30 and meta["documents_read"] == meta["unique_documents"] + 30
    assert [i["path"].rsplit("/", 1)[-1] for i in meta["inputs"]] == ["a.txt", "b.jsonl.gz", "c.txt"]


def test_split_is_by_hash_whatever_the_order_and_duplicates_stay_on_one_side(mixed_inputs, tmp_path):
    _, inputs = mixed_inputs
    a = prepare_dataset(inputs, tmp_path / "a", vocab_size=400, workers=2)
    b = prepare_dataset(list(reversed(inputs)), tmp_path / "b", tokenizer=a.path, workers=2)
    a_val, b_val = decoded_documents(a, "val"), decoded_documents(b, "val")
    assert sorted(a_val) == sorted(b_val) and len(a_val) == a.meta["val_documents"] > 0
    a_train = decoded_documents(a, "train")
    assert not set(a_train) & set(a_val) and len(a_train) == len(set(a_train)) == a.meta["train_documents"]
    assert a.meta["split_seed"] == 1337 and a.meta["split"].startswith("hash: validation when")
    c = prepare_dataset(inputs, tmp_path / "c", tokenizer=a.path, seed=7)
    assert sorted(decoded_documents(c, "val")) != sorted(a_val)  # the seed chooses the split


def test_tiny_corpus_still_holds_out_a_document(tmp_path, small_dataset):
    src = tmp_path / "two.txt"
    src.write_text("the first document here\n\nand a second one there\n")
    ds = prepare_dataset([src], tmp_path / "out", tokenizer=small_dataset.path, workers=1)
    assert ds.meta["train_documents"] == 1 and ds.meta["val_documents"] == 1


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ({"r.jsonl": '{"text": "ok"}\n{"body": "x"}\n'}, [], r"r.jsonl line 2: no 'text' field"),
        ({"r.jsonl": '{"text": "ok"}\nnot json\n'}, [], r"r.jsonl line 2: not valid JSON"),
        ({"t.txt.gz": b"\x1f\x8b\x08\x00garbage"}, [], r"t.txt.gz: corrupt or truncated"),
        ({"t.txt": "text\n"}, ["--text-field", "body", "--input", "nothing-*.jsonl"], "no files match"),
        ({"t.txt": "one document\n"}, [], "at least 2 are needed"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, files, extra, message):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["prepare", "--input", *[str(tmp_path / n) for n in files], "--output-dir", str(tmp_path / "out")]
    r = cli(*args, *[str(tmp_path / e) if e.startswith("nothing") else e for e in extra])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_skip_bad_records_counts_them(tmp_path, small_corpus):
    lines = [json.dumps({"text": p}) for p in small_corpus.read_text().split("\n\n") if p.strip()]
    lines[5] = '{"title": "no text here"}'
    lines[9] = "{broken"
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(OpenLLMError, match="line 6: no 'text' field"):
        prepare_dataset([tmp_path / "r.jsonl"], tmp_path / "strict", vocab_size=400)
    ds = prepare_dataset([tmp_path / "r.jsonl"], tmp_path / "lenient", vocab_size=400, skip_bad_records=True)
    assert ds.meta["bad_records_skipped"] == {"missing field": 1, "not JSON": 1}


def synthetic_corpus(path, size: int, source) -> int:
    """``size`` bytes of unique paragraphs recombined from real sentences (deterministic)."""
    sentences = [s.strip() for s in source.read_text(encoding="utf-8").replace("\n", " ").split(".") if s.strip()]
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            para = ". ".join(rng.choice(sentences) for _ in range(rng.randint(3, 9))) + f". ({written})\n\n"
            f.write(para)
            written += len(para.encode("utf-8"))
    return written


def test_killed_preparation_leaves_no_partial_dataset_and_reruns_cleanly(tmp_path, squad_path, small_dataset):
    src = tmp_path / "big.txt"
    synthetic_corpus(src, 8_000_000, squad_path)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "openllm",
        "prepare",
        "--input",
        str(src),
        "--output-dir",
        str(out),
        "--tokenizer",
        str(small_dataset.path),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60

    def spooled() -> int:  # bytes of documents spooled so far
        return sum(p.stat().st_size for p in out.glob(".prepare-*/train.txt") if p.exists())

    while time.time() < deadline and proc.poll() is None and spooled() < 2_000_000:  # killed mid-way
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for name in ("meta.json", "train.bin", "val.bin"):
        assert not (out / name).exists(), name
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "meta.json").is_file() and not list(out.glob(".prepare-*"))


def test_memory_does_not_grow_with_the_corpus(tmp_path, squad_path, small_dataset):
    """Peak RSS of a prepare of 24 MB exceeds that of a 4 MB one (both past the encoder's chunk size) by far
    less than the extra text itself (the whole-file version held about 20x the corpus)."""

    def peak(path) -> int:  # the kernel's record of the process's peak resident memory, in bytes
        args = ["-m", "openllm", "prepare", "--input", str(path), "--output-dir", str(path.with_suffix(""))]
        proc = subprocess.Popen(
            [sys.executable, *args, "--tokenizer", str(small_dataset.path), "--workers", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        return usage.ru_maxrss * 1024

    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    extra = synthetic_corpus(big, 24_000_000, squad_path) - synthetic_corpus(small, 4_000_000, squad_path)
    growth = peak(big) - peak(small)
    assert growth < extra / 3, f"peak RSS grew by {growth / 1e6:.0f} MB for {extra / 1e6:.0f} MB more text"


def tagged_processes(tag: str) -> list:
    """The live processes whose environment carries ``OPENLLM_TEST_TAG=tag`` (a run and every process it forked,
    wherever they were re-parented)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("OPENLLM_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.parametrize("command, sig", [("prepare", "KILL"), ("prepare", "TERM"), ("train", "TERM")])
def test_a_killed_preparation_takes_its_workers_along_and_the_rerun_succeeds(
    tmp_path, squad_path, small_dataset, command, sig
):
    """Killed (by itself, at its second encoded chunk, so deterministically mid-encoding) while the workers
    encode, as `openllm prepare` or as `openllm train --data-file` preparing first: no process of the run
    survives it, the pipe reading its output sees its end, and the rerun in the same directory (`--resume
    auto` for train) is not refused (workers that lived on kept the lock, the spool and the pipe)."""
    import psutil

    src = tmp_path / "big.txt"
    synthetic_corpus(src, 3_000_000, squad_path)  # three chunks of training text
    out, tag = tmp_path / "out", f"{os.getpid()}-{command}-{sig}"
    args = [sys.executable, "-m", "openllm"]
    if command == "prepare":
        args += ["prepare", "--input", str(src), "--output-dir", str(out), "--tokenizer", str(small_dataset.path)]
        args += ["--workers", "2"]
        dataset = out
    else:  # the small run's options, on raw text (encoded with the default workers: one per CPU)
        args += ["train", "--data-file", str(src), "--tokenizer-dir", str(small_dataset.path), "--output-dir", str(out)]
        args += small_args(small_dataset, out, "--max-steps", "2")[5:]  # (after: train --data D --output-dir O)
        dataset = out / "dataset"
    env = dict(os.environ, OPENLLM_TEST_TAG=tag, OPENLLM_FAULT=f"encode:2:{sig}")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # as `| tee` reads it
    try:
        proc.wait(timeout=120)
        assert proc.returncode == -getattr(signal, "SIG" + sig)
        _, survivors = psutil.wait_procs(tagged_processes(tag), timeout=5)
        assert not survivors, f"{len(survivors)} process(es) of the killed run live on"
        assert proc.stdout.read() is not None  # (returns: nothing else holds the pipe open)
    finally:
        for p in tagged_processes(tag):
            p.kill()
    assert not (dataset / "meta.json").exists()
    rerun = args + (["--resume", "auto"] if command == "train" else [])
    r = subprocess.run(rerun, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (dataset / "meta.json").is_file() and not list(dataset.glob(".prepare-*"))
    assert not list(tmp_path.glob(".out.lock*")) and not list(out.glob(".dataset.lock*"))


def test_a_lock_whose_holder_died_is_taken_over_from_what_it_left_behind(tmp_path):
    """A lock file naming a dead process, its flock still held by a process left behind (as the orphaned workers
    of a killed preparation held it): stale, so the next command takes it over; a live holder is still refused."""
    from openllm.core.fileio import directory_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".out.lock"
    keep = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, 2); "
    keep += f"os.write(fd, b'{dead.pid}'); print('held', flush=True); time.sleep(60)"
    left = subprocess.Popen([sys.executable, "-c", keep, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert left.stdout.readline() == "held\n"
        with directory_lock(tmp_path / "out", "dataset directory"):
            assert lock.read_text() == str(os.getpid())
            (tmp_path / "x.txt").write_text("one\n\ntwo\n")
            r = cli("prepare", "--input", str(tmp_path / "x.txt"), "--output-dir", str(tmp_path / "out"))
            assert r.returncode == 2 and f"in use by another openllm process (pid {os.getpid()})" in r.stderr, r.stderr
        assert not lock.exists() and left.poll() is None  # released; what was left behind was not touched
    finally:
        left.kill()
        left.wait()


@pytest.mark.parametrize("part", [False, True])
def test_a_killed_preparation_rerun_reuses_its_finished_chunks_and_writes_the_same_bytes(
    tmp_path, squad_path, small_dataset, part
):
    kill_at = 2  # (of three chunks of training text and one of validation text)
    src = tmp_path / "big.txt"
    synthetic_corpus(src, 3_000_000, squad_path)  # three chunks of training text and one of validation text
    inputs, shard = [src], {}
    if part:  # part 0 of 2 (the big file; the second part is the small one): its document index too
        (tmp_path / "small.txt").write_text("A second file.\n\nOf two paragraphs.\n")
        inputs, shard = [src, tmp_path / "small.txt"], {"num_shards": 2, "shard_index": 0}
    ref = prepare_dataset(inputs, tmp_path / "ref", tokenizer=small_dataset.path, workers=2, **shard)
    out = tmp_path / "out"
    args = ["prepare", "--input", *map(str, inputs), "--output-dir", str(out), "--tokenizer", str(small_dataset.path)]
    args += ["--num-shards", "2", "--shard-index", "0"] if part else []
    r = cli(*args, "--workers", "2", env={"OPENLLM_FAULT": f"encode:{kill_at}"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "meta.json").exists() and len(list(out.glob(".prepare-*"))) == 1
    r = cli(*args, "--workers", "1")  # (the worker count does not change the bytes)
    assert r.returncode == 0, r.stderr
    assert "reusing the documents and tokenizer an interrupted run left" in r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["timing"]["chunks_reused"] == kill_at
    for name in ("train.bin", "val.bin", *(("documents.npy",) if part else ())):
        assert (out / name).read_bytes() == (ref.path / name).read_bytes(), name
    assert meta["fingerprint"] == ref.meta["fingerprint"] and not list(out.glob(".prepare-*"))
