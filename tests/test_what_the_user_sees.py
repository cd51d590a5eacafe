"""What the user sees is what happens (issue 22, class 9): options spelled whole, a busy port named before
anything is said, one served model, resumed runs keep their closing-sample options, inspect shows the model
that runs."""

import socket

import httpx

from openllm.model.config import ModelConfig
from tests.conftest import cli, small_args


def test_options_must_be_spelled_whole(tmp_path):
    r = cli("train", "--max-step", "2", "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "unrecognized arguments: --max-step 2" in r.stderr
    assert not (tmp_path / "run").exists()


def test_serve_on_a_busy_port_is_one_error_before_anything_is_said(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = cli("serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "another server" in r.stderr
    assert r.stderr.count("\n") == 1 and "serving" not in r.stdout and "Errno" not in r.stderr


def test_a_request_for_another_model_is_a_404_like_its_model_page(server):
    url, _ = server
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": "other", "max_tokens": 2}
        body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
        r = httpx.post(url + path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert httpx.get(url + "/v1/models/other").status_code == 404
    ok = httpx.post(url + "/v1/completions", json={"model": "tiny-test", "prompt": "x", "max_tokens": 2})
    unnamed = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and unnamed.status_code == 200


def test_serve_help_lists_every_endpoint():
    r = cli("serve", "--help")
    for endpoint in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health"):
        assert endpoint in r.stdout.replace("\n", " "), endpoint


def test_a_resumed_run_keeps_its_sample_options(small_dataset, tmp_path):
    out = tmp_path / "run"
    first = cli(*small_args(small_dataset, out, "--max-steps", "3"))  # small_args says --sample-tokens 0
    assert first.returncode == 0 and "--- sample" not in first.stdout, first.stderr
    resumed = cli("train", "--output-dir", str(out), "--resume", "auto", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "--- sample" not in resumed.stdout  # inherited from the checkpoint, not the default 120
    asked = cli("train", "--output-dir", str(out), "--resume", "auto", "--max-steps", "5", "--sample-tokens", "4")
    assert asked.returncode == 0 and "--- sample from best_model.pt ---" in asked.stdout, asked.stderr


def test_inspect_shows_the_mlp_a_llama_model_runs():
    llama = ModelConfig(arch="llama", n_layer=2, n_head=4, n_embd=128, bias=False, block_size=64).describe()
    assert "activation" not in llama and llama["intermediate_size"] == 384 and llama["n_kv_head"] == 4
    assert llama["mlp"].startswith("SwiGLU")
    gpt2 = ModelConfig(arch="gpt2", n_layer=2, n_head=4, n_embd=128, block_size=64).describe()
    assert gpt2["activation"] == "gelu" and "intermediate_size" not in gpt2 and "rope_theta" not in gpt2
