"""Shared fixtures: small corpora written by the tests and the real texts in ../shared/data."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def quiet(_message: str) -> None:
    """A log function that prints nothing (training's chatter stays out of test output)."""


def cli(*args: str, env: dict | None = None, cwd=None, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m openllm ARGS`` as a user would; returns the finished process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "openllm", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        cwd=cwd,
        **kw,
    )


def load(path):
    """A checkpoint file as a plain dict, loaded the safe way."""
    import torch

    return torch.load(path, weights_only=True)


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or the bundled Shakespeare copy when ../shared is absent."""
    path = SHARED_DATA / name
    if path.is_file():
        return path
    if name == "tinyshakespeare.txt":
        return BUNDLED
    pytest.fail(f"{path} is missing: the tests need ../shared/data beside the checkout")


@pytest.fixture(scope="session")
def squad_path() -> Path:
    return shared_file("squad_passages.txt")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return shared_file("tinyshakespeare.txt")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~300 paragraphs cut from Shakespeare: enough for a tokenizer of a few hundred entries."""
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    paras = [p for p in text.split("\n\n") if p.strip()][:400]
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_dataset(small_corpus, tmp_path_factory):
    from openllm.data.prepare import prepare_dataset

    return prepare_dataset([small_corpus], tmp_path_factory.mktemp("ds") / "small", vocab_size=420)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)


@pytest.fixture(scope="module")
def server(small_dataset):
    """A live OpenLLM server (tiny random model) on a free loopback port: (base url, app)."""
    import socket
    import threading
    import time

    import torch
    import uvicorn

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel
    from openllm.inference.server import ServerLimits, create_app
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    tok = load_tokenizer(small_dataset.tokenizer_path)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0)
    ).eval()
    app = create_app(
        LoadedModel(model, tok, small_dataset.path), "tiny-test", ServerLimits(max_tokens=64, max_queue=80)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)
