"""Property-based tests: bad options, config files, corpora and HTTP requests get clear errors."""

import asyncio
import json
import re

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openllm.cli import main
from openllm.core.errors import OpenLLMError
from openllm.data.prepare import prepare_dataset

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
TRIED = {"options": 0, "config files": 0, "corpora": 0, "requests": 0}


@pytest.fixture(autouse=True)
def inputs_tried():
    """Each test here tries inputs and counts them: a test that tried none fails (the property did not run);
    the figures docs/reliability.md quotes are printed (run with -s)."""
    before = sum(TRIED.values())
    yield
    assert sum(TRIED.values()) > before, "the test tried no input"
    print(f"\nreliability figures so far in this process: {json.dumps(TRIED)}")


not_a_number = st.text(alphabet="abcxyz!@-_ ", min_size=1, max_size=6).filter(
    lambda t: not re.fullmatch(r"[\s\d.+-]*", t)
)
POSITIVE_INTS = [
    "max-steps",
    "batch-size",
    "seq-len",
    "eval-every",
    "save-every",
    "eval-batches",
    "keep-last",
    "gradient-accumulation-steps",
    "log-every",
    "max-bad-steps",
    "vocab-size",
]
NONNEG_INTS = ["warmup-steps", "early-stopping-patience", "seed"]
FLOATS = ["learning-rate", "min-lr", "weight-decay", "grad-clip", "early-stopping-min-delta"]

bad_option = st.one_of(
    st.tuples(st.sampled_from(POSITIVE_INTS), st.one_of(st.integers(max_value=0).map(str), not_a_number)),
    st.tuples(st.sampled_from(NONNEG_INTS), st.one_of(st.integers(max_value=-1).map(str), not_a_number)),
    st.tuples(st.sampled_from(FLOATS), st.sampled_from(["nan", "inf", "-inf", "-1", "-0.5", "1e400", "x"])),
    st.tuples(st.just("seq-len"), st.integers(129, 10**7).map(str)),
    st.tuples(st.just("dropout"), st.one_of(st.floats(1.0, 1e9).map(str), st.floats(-1e9, -1e-9).map(str))),
    st.tuples(st.sampled_from(["device", "dtype", "model-size"]), st.text(alphabet="abcdefgh", min_size=1, max_size=8)),
)


def one_clear_line(capsys):
    err = capsys.readouterr().err
    assert err.strip() and err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


@SETTINGS
@given(option=bad_option)
def test_bad_train_options(option, tmp_path_factory, small_dataset, capsys):
    TRIED["options"] += 1
    name, value = option
    out = tmp_path_factory.mktemp("o") / "run"
    try:
        code = main(["train", "--data", str(small_dataset.path), "--output-dir", str(out), f"--{name}", value])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    one_clear_line(capsys)
    assert not out.exists()


config_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 0),
    st.sampled_from([float("nan"), -1.5]),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


def valid_config_value(key, v):
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if key in [k.replace("-", "_") for k in POSITIVE_INTS]:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    if key in [k.replace("-", "_") for k in FLOATS]:
        return number and v == v and v >= 0
    if key == "dropout":
        return number and 0 <= v < 1
    return v in ("auto", "cpu", "cuda")


@SETTINGS
@given(data=st.data())
def test_bad_config_files(data, tmp_path_factory, small_dataset, capsys):
    TRIED["config files"] += 1
    kind = data.draw(st.sampled_from(["unknown key", "bad value", "not a mapping", "not yaml"]))
    d = tmp_path_factory.mktemp("c")
    cfg = d / "run.yaml"
    if kind == "unknown key":
        key = data.draw(
            st.text(alphabet="abcdefgh_", min_size=1, max_size=12).filter(
                lambda k: (
                    k.replace("-", "_") not in __import__("openllm.training.config", fromlist=["x"]).TRAIN_OPTION_NAMES
                )
            )
        )
        cfg.write_text(yaml.safe_dump({key: 1, "max_steps": 2}))
    elif kind == "bad value":
        key = data.draw(st.sampled_from([k.replace("-", "_") for k in POSITIVE_INTS + FLOATS] + ["dropout", "device"]))
        value = data.draw(config_value.filter(lambda v: not valid_config_value(key, v)))
        cfg.write_text(yaml.safe_dump({key: value}))
    elif kind == "not a mapping":
        cfg.write_text(yaml.safe_dump(data.draw(st.lists(st.integers(), min_size=1, max_size=3))))
    else:
        cfg.write_text("max_steps: [1, 2\n")
    out = d / "run"
    code = main(["train", "--config", str(cfg), "--data", str(small_dataset.path), "--output-dir", str(out)])
    assert code == 2
    one_clear_line(capsys)
    assert not out.exists()


corpus = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=3000),
    st.lists(
        st.sampled_from(["word ", "Other words.", "\r\n", "\n", "\r", "\n\n", "\t", "  ", "é", "漢", "\x0b"]),
        max_size=400,
    )
    .map("".join)
    .map(str.encode),
    st.integers(1, 200_000).map(lambda n: ("abc " * n).encode()),  # one enormous line
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=corpus)
def test_any_corpus_prepares_or_is_refused_cleanly(content, tmp_path_factory):
    TRIED["corpora"] += 1
    d = tmp_path_factory.mktemp("p")
    src = d / "in.txt"
    src.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    out = d / "out"
    try:
        ds = prepare_dataset([src], out, vocab_size=300)
    except OpenLLMError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not out.exists()
        return
    m = ds.meta
    assert m["documents_read"] == m["unique_documents"] + m["duplicates_dropped"]
    assert m["train_documents"] + m["val_documents"] == m["unique_documents"]
    assert ds.train.size == m["train_tokens"] > 0


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
request_body = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": json_value,
            "max_tokens": json_value,
            "temperature": json_value,
            "top_p": json_value,
            "n": json_value,
            "stop": json_value,
            "seed": json_value,
            "stream": json_value,
        },
    ).map(lambda d: json.dumps(d).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.just(json.dumps({"prompt": "x", "max_tokens": 10**12}).encode()),
    st.just(b'{"prompt": "\xff\xfe"}'),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=request_body)
def test_any_request_body_gets_a_well_formed_answer(server, body):
    TRIED["requests"] += 1
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text)
    payload = r.json() if not r.headers["content-type"].startswith("text/event-stream") else None
    if r.status_code >= 400:
        assert payload["error"]["message"] and payload["error"]["type"]
    elif payload is not None:
        assert payload["choices"] and all(isinstance(c["text"], str) for c in payload["choices"])


def test_a_hundred_concurrent_clients_some_bad_some_leaving(server):
    url, app = server

    async def client(i, http):
        if i % 4 == 0:
            r = await http.post(url + "/v1/completions", content=b"{bad", headers={"Content-Type": "application/json"})
            return r.status_code == 400
        if i % 4 == 1:  # hang up mid-stream
            async with http.stream(
                "POST", url + "/v1/completions", json={"prompt": "A", "max_tokens": 60, "stream": True}
            ) as r:
                async for _ in r.aiter_lines():
                    break
            return True
        r = await http.post(url + "/v1/completions", json={"prompt": "KING:", "max_tokens": 6, "stream": i % 4 == 2})
        return r.status_code == 200

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*[client(i, http) for i in range(100)])

    assert all(asyncio.run(run()))
    engine = app.state.engine
    for _ in range(200):
        if engine.waiting == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert engine.waiting == 0
    assert httpx.get(url + "/health").json()["status"] == "ok"
    TRIED["requests"] += 100


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_bytes_as_a_checkpoint_are_reported_never_crash(data, tmp_path_factory, small_dataset):
    from openllm.checkpoint import format as ck

    TRIED["checkpoint files"] = TRIED.get("checkpoint files", 0) + 1
    d = tmp_path_factory.mktemp("k")
    path = d / "x.pt"
    kind = data.draw(st.sampled_from(["random", "mutated"]))
    if kind == "random":
        path.write_bytes(data.draw(st.binary(max_size=5000)))
    else:  # a real (small) checkpoint with bytes overwritten at random places
        import torch

        torch.save({"model_state_dict": {"w": torch.arange(64.0)}, "step": 1}, path)
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
    v = ck.verify_checkpoint(path)
    assert not v.ok  # random bytes never, and the mutated file lacks the required keys anyway
    assert all(isinstance(p, str) and p for p in v.problems)
