"""`openllm push`: what a dry run lists for an export and for a run directory (exported first, GGUF too), the
repository name checked, and every failure of the upload (no token, no network, a refusal) one line. These
machines cannot reach the Hub: the live upload is not run here."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from openllm.interop.export import HF_FILES
from tests.conftest import cli


@pytest.fixture
def hub_env(tmp_path):
    """No token anywhere (an empty HF_HOME, HF_TOKEN empty) and temporary files under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "hf_home").mkdir()
    return {"HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "", "TMPDIR": str(tmp_path / "tmp")}


def listed(stdout: str) -> dict[str, int]:
    """The dry run's file list: name -> bytes."""
    out = {}
    for line in stdout.splitlines():
        if line.endswith(" bytes"):
            name, size, _ = line.split()
            out[name] = int(size.replace(",", ""))
    return out


def test_a_dry_run_lists_what_a_run_directory_and_an_export_would_upload(llama_run, tmp_path, hub_env):
    r = cli("push", str(llama_run), "--repo", "someone/tiny-model", "--dry-run", "--gguf", env=hub_env)
    assert r.returncode == 0, r.stderr
    files = listed(r.stdout)
    assert set(files) >= {*HF_FILES, "tokenizer.model", "model.gguf"} and all(files.values()), r.stdout
    assert "would upload" in r.stdout and "someone/tiny-model (main)" in r.stdout
    assert not list((tmp_path / "tmp").iterdir())  # the export made for the upload is gone
    # an export directory is listed as it is, file for file
    assert cli("export", "--checkpoint", str(llama_run), "--output-dir", str(tmp_path / "hf")).returncode == 0
    r = cli("push", str(tmp_path / "hf"), "--repo", "someone/tiny-model", "--revision", "v1", "--dry-run", env=hub_env)
    assert r.returncode == 0, r.stderr
    assert listed(r.stdout) == {p.name: p.stat().st_size for p in (tmp_path / "hf").iterdir()}
    assert "someone/tiny-model (v1)" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo", "tiny-model"], "--repo must be USER/NAME"),
        (["--repo", "a/b/c"], "--repo must be USER/NAME"),
        (["--repo", "someone/bad name"], "is not a valid Hub repository name"),
        (["--repo", "someone/x", "--revision", " "], "--revision must be a branch name"),
        (["--repo", "someone/x"], "no Hugging Face token: set HF_TOKEN"),
    ],
)
def test_bad_names_and_a_missing_token_are_one_line(llama_run, hub_env, args, message):
    r = cli("push", str(llama_run), *args, env=hub_env)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_an_export_directory_is_refused_with_gguf_and_when_it_does_not_verify(llama_run, tmp_path, hub_env):
    assert cli("export", "--checkpoint", str(llama_run), "--output-dir", str(tmp_path / "hf")).returncode == 0
    r = cli("push", str(tmp_path / "hf"), "--repo", "a/b", "--gguf", "--dry-run", env=hub_env)
    assert r.returncode == 2 and "--gguf exports from a run directory or checkpoint" in r.stderr, r.stderr
    # a directory `openllm export --format gguf` wrote is an export too
    assert cli("export", "--checkpoint", str(llama_run), "--output-dir", str(tmp_path / "g"), "--format", "gguf",
               "--gguf-dtype", "f32").returncode == 0  # fmt: skip
    r = cli("push", str(tmp_path / "g"), "--repo", "a/b", "--dry-run", env=hub_env)
    assert r.returncode == 0 and set(listed(r.stdout)) == {"model.gguf", "README.md"}, r.stdout + r.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "n_embd": 3, "hidden_size": 3}))
    r = cli("push", str(tmp_path / "hf"), "--repo", "a/b", "--dry-run", env=hub_env)
    assert r.returncode == 2 and "does not verify, so it is not uploaded" in r.stderr, r.stderr


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A stand-in Hub: with ``refuse``, every token is refused; else someone/public exists and is public."""

    refuse = True

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if not self.refuse and self.path.startswith("/api/models/someone/public"):
            return self._send(200, {"id": "someone/public", "private": False, "sha": "0" * 40})
        self._send(401 if self.refuse else 404, {"error": "Invalid credentials in Authorization header"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.refuse and self.path == "/api/repos/create":
            return self._send(409, {"error": "You already created this model repo", "url": "someone/public"})
        self._send(401 if self.refuse else 500, {"error": "Invalid credentials in Authorization header"})

    do_PUT = do_POST

    def log_message(self, *args) -> None:  # quiet
        pass


def _stand_in(refuse: bool) -> http.server.ThreadingHTTPServer:
    handler = type("Handler", (_StandIn,), {"refuse": refuse})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_unreachable_hub_and_a_refused_token_are_one_line(llama_run, hub_env):
    env = {**hub_env, "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed port
    r = cli("push", str(llama_run), "--repo", "someone/x", env=env)
    assert r.returncode == 2 and "could not reach the Hub (http://127.0.0.1:9)" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0
    server = _stand_in(refuse=True)
    try:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
        r = cli("push", str(llama_run), "--repo", "someone/x", env=env)
    finally:
        server.shutdown()
    assert r.returncode == 2 and "the Hub refused the upload to someone/x: the token was refused" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_private_is_not_ignored_for_an_existing_public_repository(llama_run, hub_env):
    server = _stand_in(refuse=False)
    try:
        env = {**hub_env, "HF_TOKEN": "hf_x", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        r = cli("push", str(llama_run), "--repo", "someone/public", "--private", env=env)
    finally:
        server.shutdown()
    assert r.returncode == 2 and "someone/public already exists and is public" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0
