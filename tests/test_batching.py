"""Continuous batching: sequences decoded together give what each gives alone, rows are refilled, and
readers that stop or go away free their rows."""

import threading

import pytest
import torch

from openllm.inference.batching import Batcher
from openllm.inference.generate import SamplingOptions, generate_ids
from openllm.model import build_model
from openllm.model.config import ModelConfig

ARCHS = {"gpt2": {}, "llama": dict(arch="llama", bias=False, n_kv_head=1)}


def model_for(arch):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=24, dropout=0.0, **ARCHS[arch])
    return build_model(config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_sixteen_greedy_sequences_together_equal_each_alone(arch):
    model = model_for(arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (16,), generator=g)]
    lengths = [5 + 3 * (i % 6) for i in range(16)]  # some run past the 24-token context and slide
    alone = [
        list(generate_ids(model, p, SamplingOptions(max_new_tokens=n, temperature=0)))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    batcher = Batcher(model, slots=16)
    streams = [
        batcher.submit(p, SamplingOptions(max_new_tokens=n, temperature=0), None, threading.Event())
        for p, n in zip(prompts, lengths, strict=True)
    ]
    together = [[t for t, _ in s] for s in streams]
    assert together == alone
    assert batcher.steps < sum(lengths) / 4  # they really shared model calls
    assert batcher.busy == 0


def test_more_sequences_than_rows_wait_and_refill_freed_rows_with_seeded_sampling():
    model = model_for("gpt2")
    opts = [SamplingOptions(max_new_tokens=6 + i % 4, temperature=0.9, top_k=None, seed=i) for i in range(10)]
    prompts = [[1 + i, 2, 3 + i] for i in range(10)]
    alone = [list(generate_ids(model, p, o)) for p, o in zip(prompts, opts, strict=True)]
    batcher = Batcher(model, slots=3)
    streams = [batcher.submit(p, o, None, threading.Event()) for p, o in zip(prompts, opts, strict=True)]
    assert [[t for t, _ in s] for s in streams] == alone  # per-sequence seeds and options
    assert batcher.busy == 0 and batcher.cache.lengths == [0, 0, 0]


def test_logprobs_end_of_text_and_readers_that_leave():
    model = model_for("llama")
    batcher = Batcher(model, slots=4)
    ids = [3, 4, 5]
    first = next(iter(generate_ids(model, ids, SamplingOptions(max_new_tokens=1, temperature=0))))
    # the first greedy token as end of text: nothing is yielded
    assert list(batcher.submit(ids, SamplingOptions(max_new_tokens=5, temperature=0), first, threading.Event())) == []
    token, logp = next(batcher.submit(ids, SamplingOptions(max_new_tokens=5, temperature=0), None, threading.Event()))
    assert token == first and abs(float(logp.exp().sum()) - 1) < 1e-5 and int(logp.argmax()) == first
    cancel = threading.Event()
    gone = batcher.submit(ids, SamplingOptions(max_new_tokens=10_000, temperature=0), None, cancel)
    closed = batcher.submit(ids, SamplingOptions(max_new_tokens=10_000, temperature=0), None, threading.Event())
    next(gone)
    next(closed)
    cancel.set()  # the client went away
    closed.close()  # the reader has what it wants
    for _ in gone:
        pass
    deadline = threading.Event()
    for _ in range(200):
        if batcher.busy == 0:
            break
        deadline.wait(0.05)
    assert batcher.busy == 0 and not any(batcher.cache.lengths)
