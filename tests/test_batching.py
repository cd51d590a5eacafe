"""The inference engine: sequences decoded together give what each gives alone, rows are refilled, readers
that stop or go away free their rows, log-probabilities are computed only for the sequences that ask, a
step brings its tokens to the host in one transfer, and past the context every token sees the last
block_size tokens (nanoGPT's rule)."""

import threading

import pytest
import torch

from openllm.inference.engine import Engine
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
    batcher = Engine(model, slots=16)
    streams = [
        batcher.submit(p, SamplingOptions(max_new_tokens=n, temperature=0), None, threading.Event())
        for p, n in zip(prompts, lengths, strict=True)
    ]
    together = [[step.token for step in s] for s in streams]
    assert together == alone
    assert batcher.steps < sum(lengths) / 4  # they really shared model calls
    assert batcher.busy == 0


def test_more_sequences_than_rows_wait_and_refill_freed_rows_with_seeded_sampling():
    model = model_for("gpt2")
    opts = [SamplingOptions(max_new_tokens=6 + i % 4, temperature=0.9, top_k=None, seed=i) for i in range(10)]
    prompts = [[1 + i, 2, 3 + i] for i in range(10)]
    alone = [list(generate_ids(model, p, o)) for p, o in zip(prompts, opts, strict=True)]
    batcher = Engine(model, slots=3)
    streams = [batcher.submit(p, o, None, threading.Event()) for p, o in zip(prompts, opts, strict=True)]
    assert [[step.token for step in s] for s in streams] == alone  # per-sequence seeds and options
    assert batcher.busy == 0 and batcher.cache.lengths == [0, 0, 0]


def test_logprobs_end_of_text_and_readers_that_leave():
    model = model_for("llama")
    batcher = Engine(model, slots=4)
    ids = [3, 4, 5]
    first = next(iter(generate_ids(model, ids, SamplingOptions(max_new_tokens=1, temperature=0))))
    # the first greedy token as end of text: nothing is yielded
    assert list(batcher.submit(ids, SamplingOptions(max_new_tokens=5, temperature=0), first, threading.Event())) == []
    step = next(batcher.submit(ids, SamplingOptions(max_new_tokens=5, temperature=0), None, logprobs=3))
    assert step.token == first and step.top[0][0] == first and step.logprob == step.top[0][1] < 0
    assert len(step.top) == 3 and sorted(step.top, key=lambda p: -p[1]) == step.top
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


MIXED = [  # every kind of row a step handles: plain greedy, sampled, penalised and biased, with logprobs
    dict(temperature=0),
    dict(temperature=0.9, top_k=5, top_p=0.8, seed=1),
    dict(temperature=0, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={7: 2.0}),
    dict(temperature=1.1, top_k=None, top_p=None, seed=2, logit_bias={3: -5.0}),
]


def mixed_engine(model, logprobs):
    """An engine stepped by the caller, with one sequence of each kind of MIXED (``logprobs[i]`` for row i)."""
    engine = Engine(model, slots=4, thread=False)
    streams = [
        engine.submit([1, 2 + i, 3], SamplingOptions(max_new_tokens=40, **kind), logprobs=k)
        for i, (kind, k) in enumerate(zip(MIXED, logprobs, strict=True))
    ]
    return engine, streams


def test_log_probabilities_are_computed_only_for_the_sequences_that_ask(monkeypatch):
    model = model_for("llama")
    rows = []
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    engine, streams = mixed_engine(model, [None, None, None, None])
    for _ in range(30):  # well past the 24-token context
        engine.step()
    assert rows == []  # nobody asked: no log-softmax at all, not one over every row as before
    assert all(s.logprob is None and s.top is None for stream in streams for s in stream.items.queue)
    engine, streams = mixed_engine(model, [None, 2, None, None])
    for _ in range(30):
        engine.step()
    assert len(rows) == 30 and set(rows) == {1}  # one row asked: one row computed, each step
    asked = list(streams[1].items.queue)
    assert all(len(s.top) == 2 and s.top[0][1] >= s.logprob for s in asked)
    assert all(s.logprob is None for i in (0, 2, 3) for s in streams[i].items.queue)


def test_a_step_brings_every_rows_token_to_the_host_in_one_transfer(monkeypatch):
    """Choosing the tokens (greedy, sampled, penalised, biased, with logprobs, past the context too) stays on
    the device; what goes to the host goes in one transfer a step, not one per row."""
    model = model_for("gpt2")
    engine, streams = mixed_engine(model, [None, 3, None, 0])
    engine.step()  # (the prompts' prefill)
    transfers = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            transfers.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in range(30):
        transfers.clear()
        engine.step()
        assert transfers == ["tolist"], (step, transfers)
    monkeypatch.undo()
    assert all(len(list(s.items.queue)) == 31 for s in streams)  # every row made a token at every step


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_rows_past_the_context_equal_nanogpts_rule(arch):
    """Rows at different lengths, sliding past the 24-token context at different steps, each condition every
    token on their own last 24 tokens (nanoGPT's sample.py), log-probabilities included."""
    model = model_for(arch)
    prompts = [[1, 2, 3], list(range(5, 25)), [7] * 11, [9, 8]]

    def reference(ids, n):
        ids, out = list(ids), []
        with torch.no_grad():
            for _ in range(n):
                logits, _ = model(torch.tensor([ids[-24:]]))
                logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
                ids.append(int(logp.argmax()))
                out.append((ids[-1], float(logp[ids[-1]])))
        return out

    engine = Engine(model, slots=4)
    streams = [engine.submit(p, SamplingOptions(max_new_tokens=40, temperature=0), logprobs=0) for p in prompts]
    for prompt, stream in zip(prompts, streams, strict=True):
        got, expected = [(s.token, s.logprob) for s in stream], reference(prompt, 40)
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert max(abs(a[1] - b[1]) for a, b in zip(got, expected, strict=True)) < 1e-4


def test_a_prefill_runs_the_head_over_the_last_position_only():
    model = model_for("llama")
    positions = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[1]))
    try:
        engine = Engine(model, slots=2, thread=False)
        stream = engine.submit(list(range(1, 21)), SamplingOptions(max_new_tokens=10, temperature=0))
        for _ in range(10):
            engine.step()
    finally:
        hook.remove()
    assert len(positions) >= 10 and set(positions) == {1}  # the 20-token prefill's head too saw one position
    tokens = [s.token for s in stream]
    assert tokens == list(generate_ids(model, list(range(1, 21)), SamplingOptions(max_new_tokens=10, temperature=0)))
