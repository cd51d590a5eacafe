import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")


def test_openai_client_completion_and_stream(server):
    url, _ = server
    client = openai.OpenAI(api_key="unused", base_url=url + "/v1")
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    a = client.completions.create(model="tiny-test", prompt="ROMEO:", max_tokens=12, temperature=0.7, seed=3)
    b = client.completions.create(model="tiny-test", prompt="ROMEO:", max_tokens=12, temperature=0.7, seed=3)
    assert a.choices[0].text == b.choices[0].text  # seeded sampling is reproducible
    assert a.choices[0].finish_reason in ("stop", "length") and a.usage.prompt_tokens > 0
    greedy = client.completions.create(model="tiny-test", prompt="ROMEO:", max_tokens=12, temperature=0)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-test", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == greedy.choices[0].text
    assert len(pieces) >= 2  # it did stream
    two = client.completions.create(model="tiny-test", prompt="KING:", max_tokens=5, n=2, seed=1)
    assert [c.index for c in two.choices] == [0, 1]


def test_stop_sequences_cut_the_text(server):
    url, _ = server
    r = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 40, "temperature": 0})
    text = r.json()["choices"][0]["text"]
    if len(text) > 3:
        stop = text[2:4]
        r = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 40, "temperature": 0, "stop": stop})
        cut = r.json()["choices"][0]
        assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"


MALFORMED = [
    b"{not json",
    b"[1, 2]",
    b"\xff\xfe\x00garbage",
    json.dumps({"prompt": 5}).encode(),
    json.dumps({"prompt": "x", "max_tokens": -1}).encode(),
    json.dumps({"prompt": "x", "max_tokens": 10**9}).encode(),
    json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(),
    json.dumps({"prompt": "x", "temperature": -2}).encode(),
    json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"prompt": "x", "top_p": 0}).encode(),
    json.dumps({"prompt": "x", "n": 0}).encode(),
    json.dumps({"prompt": "x", "n": 1000}).encode(),
    json.dumps({"prompt": "x", "stop": 7}).encode(),
    json.dumps({"prompt": "x", "stream": "yes"}).encode(),
    json.dumps({"prompt": "x", "seed": -4}).encode(),
    json.dumps({"prompt": "x", "bogus": 1}).encode(),
    json.dumps({"prompt": "x" * 50_000}).encode(),
    json.dumps({"prompt": "x", "max_tokens": True}).encode(),
    json.dumps({"prompt": [1.5, 2]}).encode(),
    b"",
]


def test_malformed_requests_get_openai_shaped_4xx_and_server_stays_healthy(server):
    url, _ = server
    assert len(MALFORMED) == 20
    for body in MALFORMED:
        r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_fifty_concurrent_requests_are_each_answered_correctly(server):
    url, _ = server
    greedy = {
        p: httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}).json()["choices"][
            0
        ]["text"]
        for p in ("ROMEO:", "JULIET:")
    }

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            prompts = ["ROMEO:" if i % 2 else "JULIET:" for i in range(50)]
            rs = await asyncio.gather(
                *[
                    client.post(
                        url + "/v1/completions",
                        json={"prompt": p, "max_tokens": 8, "temperature": 0, "stream": i % 5 == 0},
                    )
                    for i, p in enumerate(prompts)
                ]
            )
            return prompts, rs

    prompts, responses = asyncio.run(run())
    for i, (p, r) in enumerate(zip(prompts, responses, strict=False)):
        assert r.status_code == 200
        if i % 5 == 0:
            text = "".join(
                json.loads(line[6:])["choices"][0]["text"]
                for line in r.text.split("\n\n")
                if line.startswith("data: {")
            )
        else:
            text = r.json()["choices"][0]["text"]
        assert text == greedy[p]  # never another request's tokens
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0


def test_client_disconnect_mid_stream_stops_generation(server):
    url, app = server
    engine = app.state.engine
    before = engine.served
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"prompt": "A", "max_tokens": 64, "n": 8, "stream": True, "temperature": 1.0},
        timeout=30,
    ) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    deadline = time.time() + 20
    while engine.waiting and time.time() < deadline:
        time.sleep(0.05)
    assert engine.waiting == 0 and engine.served == before + 1
    assert httpx.get(url + "/health").status_code == 200


def test_page_is_served(server):
    url, _ = server
    r = httpx.get(url + "/")
    assert r.status_code == 200 and "<textarea" in r.text and "/v1/completions" in r.text


# --- the rest of the completions API, chat, tokenize -----------------------------------------------


def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_logprobs_scores_token_prompts_as_evaluation_harnesses_ask(server):
    """lm-evaluation-harness's loglikelihood request: token-id prompts (a batch), echo, logprobs, no sampling."""
    import torch

    url, app = server
    loaded = app.state.engine.loaded
    ids = [loaded.tokenizer.prompt_ids(t) for t in ("ROMEO: But soft", "KING: what light")]
    body = {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    out = post(url, "/v1/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for prompt, choice in zip(ids, out["choices"], strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == loaded.tokenizer.decode(prompt) == "".join(lp["tokens"])
        assert lp["tokens"][0] == "" and prompt[0] == loaded.tokenizer.bos_id  # the bos adds no text
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(prompt))]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(prompt)
        with torch.no_grad():
            logits, _ = loaded.model(torch.tensor([prompt]))
        expected = torch.log_softmax(logits[0].float(), -1)[torch.arange(len(prompt) - 1), prompt[1:]].tolist()
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected, strict=True)) < 1e-5
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:]) and lp["text_offset"][0] == 0
    assert out["usage"]["prompt_tokens"] == sum(map(len, ids)) and out["usage"]["completion_tokens"] == 0
    one = post(url, "/v1/completions", {**body, "max_tokens": 1})["choices"][0]["logprobs"]
    assert len(one["tokens"]) == len(ids[0]) + 1  # the prompt's tokens, then the generated one
    # also when that token is the end of text (the harness drops the last entry as the generated one)
    eos = loaded.tokenizer.eos_id
    ended = post(url, "/v1/completions", {**body, "max_tokens": 1, "logit_bias": {str(eos): 100}})["choices"][0]
    assert ended["text"] == loaded.tokenizer.decode(ids[0]) and ended["finish_reason"] == "stop"
    assert len(ended["logprobs"]["tokens"]) == len(ids[0]) + 1 and ended["logprobs"]["tokens"][-1] == ""
    assert ended["logprobs"]["token_logprobs"][: len(ids[0])] == one["token_logprobs"][: len(ids[0])]


def test_generated_logprobs_bias_and_penalties_are_honoured(server):
    url, app = server
    tok = app.state.engine.loaded.tokenizer
    base = {"prompt": "The king", "max_tokens": 12, "temperature": 0}
    plain = post(url, "/v1/completions", {**base, "logprobs": 3})["choices"][0]
    lp = plain["logprobs"]
    assert "".join(lp["tokens"]) == plain["text"] and len(lp["top_logprobs"][0]) == 3
    assert all(
        abs(lp["token_logprobs"][i] - max(lp["top_logprobs"][i].values())) < 1e-6 for i in range(len(lp["tokens"]))
    )
    target = tok.encode(" the")[-1]
    forced = post(url, "/v1/completions", {**base, "logit_bias": {str(target): 100}})["choices"][0]["text"]
    assert forced.split() == tok.decode([target]).split() * 12  # (decoded in context: " the the ...")
    varied = post(url, "/v1/completions", {**base, "frequency_penalty": 2.0})["choices"][0]
    assert varied["text"] != plain["text"]  # (test_generate checks that the penalty never repeats a token)
    batch = post(url, "/v1/completions", {**base, "prompt": ["The king", "A horse"], "n": 2})["choices"]
    assert [c["index"] for c in batch] == [0, 1, 2, 3] and batch[0]["text"] == plain["text"]
    assert batch[2]["text"] == post(url, "/v1/completions", {**base, "prompt": "A horse"})["choices"][0]["text"]


def test_streamed_logprobs_join_into_the_unstreamed_ones(server):
    url, _ = server
    body = {"prompt": "The king said", "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True}
    whole = post(url, "/v1/completions", body)["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    joined: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        for key, values in (e["choices"][0]["logprobs"] or {}).items():
            joined[key] += values
    assert text == whole["text"] and joined == whole["logprobs"]


def test_echoed_and_generated_tokens_join_exactly_into_the_text(server):
    """Every logprobs entry is the text its token adds: the bos an echoed prompt starts with and the eos that
    ends a generation add "" (one entry per token still, as harnesses index them), so tokens and offsets
    describe the returned text exactly, plain and streamed, completions and chat."""
    url, app = server
    tok = app.state.engine.loaded.tokenizer
    eos = str(tok.eos_id)
    for body in (
        {"prompt": "The king said", "echo": True, "max_tokens": 6, "logprobs": 2, "temperature": 0},
        {"prompt": "KING:", "echo": True, "max_tokens": 3, "logprobs": 1, "logit_bias": {eos: 100}},
        {"prompt": tok.prompt_ids("A horse") + tok.encode(" and"), "echo": True, "max_tokens": 0, "logprobs": 0},
    ):
        choice = post(url, "/v1/completions", body)["choices"][0]
        lp, text = choice["logprobs"], choice["text"]
        assert "".join(lp["tokens"]) == text and "<s>" not in lp["tokens"] and "</s>" not in lp["tokens"], lp
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        assert lp["tokens"][0] == "" and lp["token_logprobs"][0] is None  # the bos: in the ids, not the text
    ended = post(url, "/v1/completions", {"prompt": "KING:", "max_tokens": 3, "logprobs": 1, "logit_bias": {eos: 100}})
    assert ended["choices"][0]["logprobs"]["tokens"] == [""] and ended["choices"][0]["text"] == ""
    chat = post(
        url,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True, "logit_bias": {eos: 100}},
    )["choices"][0]
    assert [e["token"] for e in chat["logprobs"]["content"]] == [""] and chat["message"]["content"] == ""


def test_a_prompt_longer_than_the_context_is_refused_unless_truncation_is_asked(server):
    url, app = server
    context = app.state.engine.loaded.model.config.block_size
    tok = app.state.engine.loaded.tokenizer
    long_ids, long_text = [5] * 100_000, "word " * (2 * context)
    for body, param in (
        ({"prompt": long_ids, "max_tokens": 1}, "prompt"),
        ({"prompt": long_text, "max_tokens": 1}, "prompt"),
        ({"prompt": ["ROMEO:", long_ids], "max_tokens": 1}, "prompt"),
        ({"prompt": long_ids, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt"),
        ({"prompt": long_text, "max_tokens": 1, "stream": True}, "prompt"),
    ):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param and error["code"] == "context_length_exceeded", r.text
        assert f"maximum context length is {context} tokens" in error["message"], error
        assert f"{len(tok.prompt_ids(long_text)) if isinstance(body['prompt'], str) else 100_000}" in error["message"]
    chat = {"messages": [{"role": "user", "content": long_text}], "max_tokens": 1}
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    # a prompt of exactly the context is served; asked for, truncation keeps the last tokens and says so in usage
    ids = list(range(10, 10 + 2 * context))
    exact = post(url, "/v1/completions", {"prompt": ids[-context:], "max_tokens": 2, "temperature": 0})
    assert exact["usage"]["prompt_tokens"] == context
    cut = {"prompt": ids, "max_tokens": 2, "temperature": 0, "truncate_prompt_tokens": context}
    answer = post(url, "/v1/completions", cut)
    assert answer["usage"]["prompt_tokens"] == context and answer["choices"] == exact["choices"]
    echoed = post(url, "/v1/completions", {**cut, "echo": True, "logprobs": 0, "max_tokens": 0})["choices"][0]
    assert echoed["text"] == tok.decode(ids[-context:]) == "".join(echoed["logprobs"]["tokens"])
    assert post(url, "/v1/chat/completions", {**chat, "truncate_prompt_tokens": context})["usage"]["prompt_tokens"] == (
        context
    )
    r = httpx.post(url + "/v1/completions", json={**cut, "truncate_prompt_tokens": context + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
    # /tokenize counts every token of a long text, so a client can see it will not fit
    counted = post(url, "/tokenize", {"prompt": long_text})
    assert counted["count"] == len(tok.prompt_ids(long_text)) > counted["max_model_len"] == context


def test_every_seed_and_choice_samples_an_independent_stream(server):
    url, _ = server

    def texts(seed: int, n: int) -> list[str]:
        body = {"prompt": "ROMEO:", "max_tokens": 16, "temperature": 1.0, "seed": seed, "n": n}
        return [c["text"] for c in post(url, "/v1/completions", body)["choices"]]

    two = texts(42, 2)
    assert two == texts(42, 2)  # seeded choices are reproducible
    assert texts(42, 1) == two[:1]  # the first choice is the single choice of the same seed
    assert texts(43, 1)[0] != two[1]  # (with seed + i, seed 43's first choice was seed 42's second)
    assert len(set(texts(7, 4) + texts(8, 4))) == 8


def test_fields_that_cannot_be_honoured_are_refused_by_name(server):
    url, _ = server
    for extra, param in [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ]:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_openai_client_usage_chunk_chat_and_models(server):
    url, _ = server
    client = openai.OpenAI(api_key="unused", base_url=url + "/v1")
    chunks = list(
        client.completions.create(
            model="tiny-test", prompt="ROMEO:", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who are you?"}]
    reply = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 0
    streamed = client.chat.completions.create(
        model="tiny-test", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reply.choices[0].message.content
    assert client.models.retrieve("tiny-test").id == "tiny-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="tiny-test", messages=messages, tools=[{"type": "function", "function": {"name": "f"}}]
        )


def test_chat_logprobs_in_the_chat_shape_plain_and_streamed(server):
    url, _ = server
    client = openai.OpenAI(api_key="unused", base_url=url + "/v1")
    messages = [{"role": "user", "content": "Who are you?"}]
    ask = dict(model="tiny-test", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    # one entry per generated token (and the end-of-text token when it ended the reply)
    assert content and len(content) - reply.usage.completion_tokens in (0, 1)
    for e in content:
        # (alternatives are named by their text, so two byte tokens that both show as U+FFFD count once)
        assert 1 <= len(e.top_logprobs) <= 3 and e.bytes == list(e.token.encode())
        assert e.logprob <= max(t.logprob for t in e.top_logprobs) + 1e-6  # greedy: the top one, or tied
    streamed = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs]
    assert [e.logprob for c in streamed for e in c.choices[0].logprobs.content] == [e.logprob for e in content]
    plain = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked, not sent
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny-test", messages=messages, top_logprobs=2)


def test_tokenize_and_detokenize(server):
    url, app = server
    tok = app.state.engine.loaded.tokenizer
    ids = post(url, "/tokenize", {"prompt": "To be, or not"})["tokens"]
    assert ids == tok.prompt_ids("To be, or not")
    assert post(url, "/detokenize", {"tokens": ids})["prompt"] == "To be, or not"
    assert httpx.post(url + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_chat_uses_the_tokenizers_own_template(small_dataset):
    from openllm.data.chat import encode_chat, with_chat_tokens
    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.protocol import Limits, parse_chat, render_chat

    tok = load_tokenizer(small_dataset.path)
    LIMITS = Limits(
        max_tokens=16, max_prompt_chars=10_000, max_n=1, max_prompts=1, vocab_size=tok.vocab_size + 2, context=64
    )
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(tok, messages) == ("User: hi\n\nAssistant:", True)
    req, default = parse_chat({"messages": messages}, LIMITS, "m", tok)
    assert req.prompts == ["User: hi\n\nAssistant:"] and default and req.stop_ids is None
    # with a template (here OpenLLM's, as `openllm finetune` adds it): the ids training encodes, ending at its turn
    chat = with_chat_tokens(tok)
    req, default = parse_chat({"messages": messages}, LIMITS, "m", chat)
    assert req.prompts == [encode_chat(chat, messages, add_generation_prompt=True)[0]] and not default
    assert req.stop_ids == {chat.piece_to_id("<|im_end|>"), chat.eos_id}


def test_sixteen_concurrent_greedy_requests_equal_their_sequential_answers(server):
    url, app = server
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "A", "The", "O", "What", "KING", "Be")] * 2
    prompts = [p + " " * (i // 8) for i, p in enumerate(prompts)]  # 16 different prompts
    body = {"max_tokens": 12, "temperature": 0}
    sequential = [
        httpx.post(url + "/v1/completions", json={"prompt": p, **body}).json()["choices"][0]["text"] for p in prompts
    ]
    steps = app.state.engine.batcher.steps

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(
                *[client.post(url + "/v1/completions", json={"prompt": p, **body}) for p in prompts]
            )
            return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(run()) == sequential
    assert app.state.engine.batcher.steps - steps < 16 * 12 / 2  # answered in shared batched steps


def test_a_hundred_clients_some_malformed_some_leaving(server):
    url, app = server

    async def client_call(client, i):
        if i % 4 == 0:  # malformed
            return (await client.post(url + "/v1/completions", json={"prompt": 5, "max_tokens": "x"})).status_code
        if i % 4 == 1:  # leaves after the first event
            async with client.stream(
                "POST", url + "/v1/completions", json={"prompt": "A", "max_tokens": 40, "stream": True}
            ) as r:
                async for _ in r.aiter_lines():
                    break
                return r.status_code
        r = await client.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 6, "stream": i % 2 == 0})
        return r.status_code

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*[client_call(client, i) for i in range(100)])

    codes = asyncio.run(run())
    assert not [c for c in codes if c >= 500]
    assert codes.count(400) == 25 and codes.count(200) == 75
    engine = app.state.engine
    for _ in range(200):
        if engine.waiting == 0 and engine.batcher.busy == 0:
            break
        time.sleep(0.05)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["waiting"] == 0 and engine.batcher.busy == 0


def test_streamed_chunks_carry_the_tokens_that_came_together_and_bad_intervals_are_refused(small_dataset):
    """--stream-interval: a streamed answer's first token goes at once, later ones may wait to go together;
    the text is the unstreamed one whatever the interval."""
    import torch

    from openllm.core.errors import OpenLLMError
    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel
    from openllm.inference.server import ServerLimits, create_app
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    tok = load_tokenizer(small_dataset.path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64, dropout=0.0))
    loaded = LoadedModel(model.eval(), tok, small_dataset.path)
    for bad in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(OpenLLMError, match="--stream-interval must be a finite number of seconds >= 0"):
            create_app(loaded, limits=ServerLimits(stream_interval=bad))
    app = create_app(loaded, "tiny-test", ServerLimits(stream_interval=60.0))
    body = {"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0, "logit_bias": {str(tok.eos_id): -100}}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as c:
            plain = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            r = await c.post("/v1/completions", json={**body, "stream": True})
            return plain, [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]

    plain, events = asyncio.run(go())
    texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert "".join(texts) == plain and len(plain) > 10
    assert len(texts) <= 2  # the first token, then the other 23 together (no chunk per token)


def test_tokens_taken_together_give_the_text_count_and_reason_of_tokens_taken_one_by_one(small_dataset):
    """A stream's steps come in batches; cutting at a stop string, counting tokens and the finish reason are
    what they are token by token."""
    import random

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.completions import ChoiceText
    from openllm.inference.engine import Step
    from openllm.inference.protocol import CompletionRequest

    tok = load_tokenizer(small_dataset.path)
    rng = random.Random(0)
    ids = tok.encode("KING: What light through yonder window breaks? It is the east, and Juliet the sun. " * 3)
    prompt = tok.prompt_ids("ROMEO:")
    for stop in ([], ["the east"], ["Juliet", "window"], ["no such text"]):
        req = CompletionRequest([""], len(ids), 0.0, 1.0, stop, 1, None, True, "m")

        def run(sizes, req=req):
            choice, i, pieces = ChoiceText(tok, prompt, req), 0, []
            while i < len(ids) and not choice.cut:
                n = sizes()
                choice.add_all([Step(t) for t in ids[i : i + n]])
                pieces.append(choice.take(0)[0])
                i += n
            pieces.append(choice.take(0, final=not choice.cut)[0])
            return "".join(pieces), choice.tokens, choice.reason, choice.cut

        one_by_one = run(lambda: 1)
        assert run(lambda: rng.randint(2, 9)) == one_by_one
        text = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        assert one_by_one[0] == (text[:cut] if cut >= 0 else text)
        assert one_by_one[2] == ("stop" if cut >= 0 else "length")
