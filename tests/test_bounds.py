"""Values that size processes, threads or memory are bounded by name, and one huge document or record is read in
bounded pieces: no option value or input line makes OpenLLM fork without limit or allocate past memory."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from openllm.core.errors import OpenLLMError
from tests.conftest import cli

# `openllm ARGS`, then the process's peak resident memory (kB) as the last line of stderr
REPORT_PEAK = (
    "import sys; from openllm.cli import main; rc = main(sys.argv[1:]); "
    "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr); "
    "sys.exit(rc)"
)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["prepare", "--workers", "100000"], "--workers"),
        (["prepare", "--max-document-mb", "5000"], "--max-document-mb"),
        (["prepare", "--tokenizer-sample-mb", "1e9"], "--tokenizer-sample-mb"),
        (["serve", "--model", "m", "--max-queue", "100000"], "--max-queue"),
        (["serve", "--model", "m", "--max-tokens", "100000000"], "--max-tokens"),
        (["generate", "--model", "m", "--max-new-tokens", "100000000"], "--max-new-tokens"),
    ],
)
def test_an_option_past_its_bound_is_refused_by_name(tmp_path, small_corpus, args, flag):
    if args[0] == "prepare":
        args = [*args, "--input", str(small_corpus), "--output-dir", str(tmp_path / "out")]
    r = cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert flag in r.stderr and ("up to" in r.stderr or "available" in r.stderr or "from" in r.stderr), r.stderr
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_the_same_values(tmp_path, small_corpus):
    from openllm.data.prepare import prepare_dataset

    with pytest.raises(OpenLLMError, match="--workers must be from 1 to"):
        prepare_dataset([small_corpus], tmp_path / "out", workers=100_000)
    assert not (tmp_path / "out").exists()


def test_a_max_batch_beyond_memory_is_refused_before_the_cache_is_allocated(small_dataset):
    """A batch of 10**8 sequences of this model's context would need terabytes of keys and values."""
    import torch

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel
    from openllm.inference.server import ServerLimits, create_app
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    tok = load_tokenizer(small_dataset.path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0))
    loaded = LoadedModel(model, tok, small_dataset.path)
    with pytest.raises(OpenLLMError, match=r"--max-batch 100,000,000 needs a key/value cache of .* at most [\d,]+ fit"):
        create_app(loaded, limits=ServerLimits(max_batch=100_000_000))
    with pytest.raises(OpenLLMError, match="--max-queue must be a positive integer up to 4,096"):
        create_app(loaded, limits=ServerLimits(max_queue=100_000))
    assert create_app(loaded, limits=ServerLimits(max_batch=64)).state.engine.batcher.slots == 64


def test_an_eval_batch_whose_logits_cannot_fit_is_refused(monkeypatch, small_dataset):
    import torch

    from openllm.model import scoring
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    monkeypatch.setattr(scoring, "available_memory", lambda device: 2**30)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=420, n_layer=1, n_head=2, n_embd=16, block_size=64, dropout=0.0))
    tokens = np.zeros(4000 * 64 + 1, dtype=np.uint16)  # 4,000 windows x 64 x 420 float32 logits, three copies
    with pytest.raises(OpenLLMError, match="--batch-size 4,000 windows of 64 tokens need about 1.2 GiB"):
        scoring.stream_nll(model, tokens, 64, 64, batch_size=10**9)
    total, count = scoring.stream_nll(model, tokens[: 8 * 64 + 1], 64, 64, batch_size=8)
    assert count == 8 * 64 and total > 0


def test_a_40_mb_line_is_read_in_bounded_pieces(tmp_path, small_corpus, small_dataset):
    """One 40 MB line in a .txt.gz and a 40 MB record in a .jsonl.gz (the old reader held each whole and
    peaked at 747 MB on the line): the line is cut into documents of at most --max-document-mb, the record
    is a bad record named by file and line, and peak memory stays near that of a small corpus."""
    paragraphs = [p for p in small_corpus.read_text().split("\n\n") if p.strip()]
    line = "all work and no play makes jack a dull boy, again " * 800_000  # 50 characters x 800,000
    with gzip.open(tmp_path / "long.txt.gz", "wt") as f:
        f.write("\n\n".join(paragraphs[:100]) + "\n\n" + line + "\n\n" + "\n\n".join(paragraphs[100:200]) + "\n")
    with gzip.open(tmp_path / "long.jsonl.gz", "wt") as f:
        for text in [*paragraphs[200:250], line, *paragraphs[250:300]]:
            f.write(json.dumps({"text": text}) + "\n")
    (tmp_path / "short.txt").write_text("\n\n".join(paragraphs[:300]) + "\n")

    def prepare(out, *inputs: str, extra=()) -> tuple[int, int, str]:
        """(exit status, peak resident bytes, stderr) of `openllm prepare` in a process of its own. The peak is
        the kernel's VmHWM, which starts afresh at exec (the rusage peak would include this forking process)."""
        args = ["prepare", "--input", *inputs, "--output-dir", str(out), "--workers", "1", "--max-document-mb"]
        args += ["0.25", "--tokenizer", str(small_dataset.path), *extra]
        r = subprocess.run([sys.executable, "-c", REPORT_PEAK, *args], capture_output=True, text=True)
        *err, peak = r.stderr.splitlines()
        return r.returncode, int(peak) * 1024, "\n".join(err)

    status, baseline, err = prepare(tmp_path / "short", str(tmp_path / "short.txt"))
    assert status == 0, err
    long_inputs = (str(tmp_path / "long.txt.gz"), str(tmp_path / "long.jsonl.gz"))
    status, peak, err = prepare(tmp_path / "long", *long_inputs, extra=["--skip-bad-records"])
    assert status == 0, err
    assert peak - baseline < 30e6, f"peak memory {peak / 1e6:.0f} MB against {baseline / 1e6:.0f} MB for a small corpus"
    meta = json.loads((tmp_path / "long" / "meta.json").read_text())
    assert meta["documents_cut"] == 1 and meta["max_document_bytes"] == 250_000
    assert meta["bad_records_skipped"] == {"too long": 1}
    assert meta["duplicates_dropped"] >= 100  # the line's pieces (of one repeated phrase) are one document

    status, _, err = prepare(tmp_path / "strict", *long_inputs)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "long.jsonl.gz line 51: longer than 0.25 MB (--max-document-mb)" in err, err
    assert not (tmp_path / "strict").exists()
