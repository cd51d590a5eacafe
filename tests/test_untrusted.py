"""Untrusted structure never reaches Python's limits (issue 22, class 4): every reader of JSON and YAML from
outside goes through the bounded reader of openllm.core.untrusted, which refuses deep nesting, huge integers
and lone surrogates with one error naming the file and the place."""

import json

import httpx
import pytest
import torch

from openllm.core.untrusted import MAX_DEPTH, BadDocument, parse_json
from tests.conftest import cli

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


def _hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "x": ' + DEEP + "}")
    (d / "model.safetensors").write_bytes(b"not read: the config comes first")
    return d


def _run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "training_log.json").write_text(DEEP)
    return d


def _jsonl(tmp_path, record: str):
    f = tmp_path / "records.jsonl"
    f.write_text('{"text": "a first good record"}\n' + record + "\n")
    return f


def _deep_log_checkpoint(tmp_path):
    nested: list = []
    for _ in range(300):  # deeper than any record, shallow enough for torch.save
        nested = [nested]
    f = tmp_path / "deep.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "step": 1, "training_log": [{"step": 1}, nested]}, f)
    return f


# each: the command line for the files made under tmp_path, and what the error must name
CASES = {
    "convert: 100k-deep config.json": (
        lambda t, d: ["convert", "--input-dir", str(_hf_dir(t)), "--output-dir", str(t / "out")],
        ["config.json", "nested more than 64 deep"],
    ),
    "generate: 100k-deep config.json": (
        lambda t, d: ["generate", "--model", str(_hf_dir(t))],
        ["config.json", "nested more than 64 deep"],
    ),
    "prepare: a deep JSON line": (
        lambda t, d: ["prepare", "--input", str(_jsonl(t, '{"text": "x", "m": ' + DEEP + "}")), "--output-dir",
                      str(t / "ds")],
        ["records.jsonl line 2", "nested more than 64 deep"],
    ),
    "prepare: a 5000-digit integer": (
        lambda t, d: ["prepare", "--input", str(_jsonl(t, '{"text": "x", "n": ' + HUGE + "}")), "--output-dir",
                      str(t / "ds")],
        ["records.jsonl line 2", "5,000 digits at $.n"],
    ),
    "prepare: a lone surrogate": (
        lambda t, d: ["prepare", "--input", str(_jsonl(t, r'{"text": "x \ud800"}')), "--output-dir", str(t / "ds")],
        ["records.jsonl line 2", "lone surrogate U+D800) at $.text"],
    ),
    "plot: a 100k-deep training_log.json": (
        lambda t, d: ["plot", str(_run_dir(t))],
        ["training_log.json", "nested more than 64 deep"],
    ),
    "train --config: a 5000-digit integer": (
        lambda t, d: ["train", "--config", str(_write(t / "c.yaml", f"seed: {HUGE}\n")), "--data", str(d.path),
                      "--output-dir", str(t / "r")],
        ["c.yaml", "5,000 digits", "line 1"],
    ),
    "train --config: 100k-deep YAML": (
        lambda t, d: ["train", "--config", str(_write(t / "c.yaml", "seed: " + DEEP + "\n")), "--data", str(d.path),
                      "--output-dir", str(t / "r")],
        ["c.yaml", "nested more than 64 deep"],
    ),
}  # fmt: skip


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_each_reader_refuses_hostile_structure_in_one_line(case, tmp_path, small_dataset):
    make, named = CASES[case]
    r = cli(*make(tmp_path, small_dataset))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("openllm "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    for word in named:
        assert word in r.stderr, (word, r.stderr)


def test_inspect_says_a_checkpoint_with_a_deep_log_is_damaged(tmp_path):
    f = _deep_log_checkpoint(tmp_path)
    r = cli("inspect", str(f))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert "nested more than 64 deep" in r.stdout + r.stderr
    r = cli("generate", "--model", str(f))  # every other command refuses it in one line
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nested more than 64 deep" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"prompt": "hi", "max_tokens": ' + HUGE + "}", "$.max_tokens"),
        ('{"prompt": "hi", "logit_bias": {"' + HUGE + '": 1}}', "logit_bias"),
        ('{"prompt": [' + HUGE + "]}", "$.prompt[0]"),
        ('{"prompt": "hi", "stop": ' + DEEP + "}", "nested more than 64 deep"),
        (r'{"prompt": "hi \udc00"}', "lone surrogate"),
        ('{"prompt": "hi", "logit_bias": {"\u00b2": 1}}', "logit_bias"),  # a digit to isdigit(), not to int()
        ('{"prompt": "hi", "max_tokens": 123456789012345678901234567890}', "max_tokens"),
    ],
)
def test_hostile_request_bodies_are_400_in_the_openai_shape(server, body, param):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["message"] + str(error["param"])), error


def test_the_bounds_are_exact_and_ordinary_documents_pass():
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(BadDocument, match="nested more than 64 deep"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    brackets = {"text": "[" * 500 + "{" * 500, "n": 10**30, "emoji": "\U0001f600"}  # in strings they are text
    assert parse_json(json.dumps(brackets)) == brackets
    assert parse_json(json.dumps(brackets).encode()) == brackets
    with pytest.raises(BadDocument, match="not valid UTF-8"):
        parse_json(b'{"text": "\xed\xa0\x80"}')  # an encoded surrogate, which json.loads(bytes) lets through
    with pytest.raises(BadDocument, match=r"in a key at \$\.a"):
        parse_json(r'{"a": {"\ud800": 1}}')
