import pytest
import torch

from openllm.inference.generate import SamplingOptions, generate_ids, next_token_logits_filter
from openllm.model import build_model
from openllm.model.config import ModelConfig
from openllm.model.gpt import GPT


def full_recompute_greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            window = ids[-model.config.block_size :]
            logits, _ = model(torch.tensor([window]))
            token = int(logits[0, -1].argmax())
            if token == 3:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("arch", [{}, {"arch": "llama", "bias": False, "n_kv_head": 1}])
def test_kv_cache_generation_equals_full_recomputation_also_past_the_context(arch):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=60, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, **arch)
    model = build_model(config).eval()
    with torch.no_grad():  # make EOS unlikely so the run is long enough to slide the window
        model.lm_head.weight[3] -= 5.0
    prompt = [2, 10, 11, 12]
    cached = list(generate_ids(model, prompt, SamplingOptions(max_new_tokens=40, temperature=0)))
    assert len(cached) == 40
    assert cached == full_recompute_greedy(model, prompt, 40)


def test_sampling_is_seeded_and_filters_apply():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=60, n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.0)).eval()
    opts = SamplingOptions(max_new_tokens=10, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    assert list(generate_ids(model, [2], opts)) == list(generate_ids(model, [2], opts))
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    filtered = next_token_logits_filter(
        logits.clone(), SamplingOptions(temperature=1.0, top_k=2, top_p=None), torch.tensor([])
    )
    assert torch.isinf(filtered[2:]).all() and torch.isfinite(filtered[:2]).all()
    filtered = next_token_logits_filter(
        logits.clone(), SamplingOptions(temperature=1.0, top_k=None, top_p=0.5), torch.tensor([])
    )
    assert torch.isfinite(filtered[0]) and torch.isinf(filtered[1:]).all()
    penalised = next_token_logits_filter(
        logits.clone(),
        SamplingOptions(temperature=1.0, top_k=None, top_p=None, repetition_penalty=2.0),
        torch.tensor([0]),
    )
    assert penalised[0] == 2.5


def test_prompts_are_cut_only_when_longer_than_the_context(small_dataset):
    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.generate import prompt_ids

    tok = load_tokenizer(small_dataset.path)
    ids, dropped = prompt_ids(tok, "ROMEO:", context=16)
    assert dropped == 0 and ids[0] == 2
    ids, dropped = prompt_ids(tok, "word " * 100, context=16)
    assert len(ids) == 16 and dropped > 0


def test_a_prompt_is_never_cut_without_being_asked():
    from openllm.inference.generate import PromptTooLong, fit_prompt

    assert fit_prompt([1, 2, 3], context=3) == [1, 2, 3]
    with pytest.raises(PromptTooLong, match="the prompt is 4 tokens, longer than the model's context of 3"):
        fit_prompt([1, 2, 3, 4], context=3)
    assert fit_prompt([1, 2, 3, 4], context=3, keep=2) == [3, 4]


def test_sample_seeds_differ_for_every_seed_and_index():
    """Sample i of seed s must not reuse another (seed, index)'s random stream, as seed + i did."""
    from openllm.inference.generate import choice_seed

    seeds = [choice_seed(s, i) for s in range(-20, 50) for i in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert choice_seed(42, 0) == 42 and choice_seed(None, 3) is None  # one sample: the seed, as always
    # derived seeds lie where no user seed can (|seed| < 2**63), so they never meet a first sample
    assert all(2**63 <= choice_seed(s, i) < 2**64 for s in (0, 2**63 - 1, -(2**63 - 1)) for i in (1, 7))


def test_continuations_are_decoded_in_context_of_the_prompt(small_dataset):
    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.generate import TextStream

    tok = load_tokenizer(small_dataset.path)
    text = "Thou art the king"
    full = tok.encode(text)
    # cut where a piece starts with the word-boundary marker: the continuation's first token carries the space
    k = next(i for i in range(1, len(full)) if tok.id_to_piece(full[i]).startswith("\u2581"))
    prompt = tok.decode(full[:k])
    stream = TextStream(tok, [2, *full[:k]])
    pieces = [stream.push(t) for t in full[k:]]
    assert prompt + "".join(pieces) + stream.finish() == text
    assert not tok.decode(full[k:]).startswith(" ")  # decoded alone, the space would be lost


def test_penalties_and_bias_apply_to_greedy_decoding_too():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=60, n_layer=1, n_head=2, n_embd=16, block_size=32, dropout=0.0)).eval()
    greedy = SamplingOptions(max_new_tokens=30, temperature=0)
    plain = list(generate_ids(model, [2, 5], greedy))
    assert len(set(plain)) < len(plain)  # this small random model repeats itself
    varied = list(generate_ids(model, [2, 5], SamplingOptions(max_new_tokens=30, temperature=0, presence_penalty=2.0)))
    assert len(set(varied)) == len(varied)  # a token already generated is pushed below every fresh one
    forced = list(generate_ids(model, [2, 5], SamplingOptions(max_new_tokens=5, temperature=0, logit_bias={7: 100.0})))
    assert forced == [7] * 5
    sampled = SamplingOptions(max_new_tokens=5, temperature=1.0, top_k=None, top_p=None, seed=1, logit_bias={9: 100.0})
    assert list(generate_ids(model, [2, 5], sampled)) == [9] * 5


def redecoded_pieces(tok, context, ids):
    """What streaming gave before it was incremental: the whole generation decoded again at every token, a
    piece held back while the text ends in an incomplete character."""
    context, skip, text, out = context[-8:], len(tok.decode(context[-8:])), "", []
    for i in range(len(ids)):
        full = tok.decode(context + ids[: i + 1])[skip:]
        if full.endswith("\ufffd"):
            out.append("")
            continue
        out.append(full[len(text) :])
        text = full
    return out, tok.decode(context + ids)[skip:][len(text) :]


class CountingTokenizer:
    """A tokenizer that records how many ids each decode call is given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        ids = list(ids)
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


def test_streamed_text_is_decoded_incrementally_and_equals_decoding_everything(small_dataset):
    """Each piece is what decoding the whole generation again gave (a space joining prompt and continuation,
    characters split over byte-fallback tokens), but every decode sees a short window, not the whole text."""
    import random

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.generate import TextStream

    tok = load_tokenizer(small_dataset.path)
    prompt = tok.prompt_ids("ROMEO: the king")
    text = " said: caf\u00e9 \u6f22\u5b57 \U0001f600 and \u00fcber" * 40  # (not in the vocabulary: byte tokens)
    generated = tok.encode(text)
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in generated) > 100
    rng = random.Random(0)
    noise = [rng.randrange(tok.vocab_size) for _ in range(400)]  # any ids: stray and split bytes, markup
    for ids in (generated, noise):
        expected, rest = redecoded_pieces(tok, prompt, ids)
        counting = CountingTokenizer(tok)
        stream = TextStream(counting, prompt)
        assert [stream.push(t) for t in ids] == expected and stream.finish() == rest
        assert max(counting.sizes) <= 2 * TextStream.CONTEXT_TOKENS + 4  # a window, not the text so far
        stream, pieces, i = TextStream(tok, prompt), [], 0
        while i < len(ids):  # several tokens at once (the server's pieces): the same text
            n = rng.randint(1, 6)
            pieces.append(stream.push_many(ids[i : i + n]))
            i += n
        assert "".join(pieces) + stream.finish() == "".join(expected) + rest
    assert "".join(redecoded_pieces(tok, prompt, generated)[0]).strip() == text.strip()  # (the reference is right)


def nanogpt_continuation(model, ids, n):
    """nanoGPT's sample.py, greedy: every token from the model run on the last block_size tokens; returns the
    tokens and each one's log-probability."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids[-model.config.block_size :]]))
            logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
            token = int(logp.argmax())
            out.append((token, float(logp[token])))
            ids.append(token)
    return out


@pytest.mark.parametrize("arch", [{}, {"arch": "llama", "bias": False, "n_kv_head": 1}])
def test_past_the_context_every_token_sees_the_last_block_size_tokens_as_nanogpt(arch):
    from openllm.inference.generate import generate_steps

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=60, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0, **arch)
    model = build_model(config).eval()
    prompt = [2, 10, 11, 12, 13]
    expected = nanogpt_continuation(model, prompt, 50)  # 39 of them past the context

    def steps(slide):
        opts = SamplingOptions(max_new_tokens=50, temperature=0, context_slide=slide)
        return [(s.token, s.logprob) for s in generate_steps(model, prompt, opts, logprobs=0)]

    window = steps("window")
    assert [t for t, _ in window] == [t for t, _ in expected]
    assert max(abs(a[1] - b[1]) for a, b in zip(window, expected, strict=True)) < 1e-4
    # the amortised rule sees one token fewer on every other step past the context: the same within it only
    amortised = steps("amortised")
    assert amortised[:12] == window[:12]
    assert max(abs(a[1] - b[1]) for a, b in zip(amortised, expected, strict=True)) > 1e-3
