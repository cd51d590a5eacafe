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
    json.dumps({"prompt": ["a", "b"]}).encode(),
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
