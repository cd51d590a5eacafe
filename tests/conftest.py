"""Shared fixtures: small corpora written by the tests and the real texts in ../shared/data."""

from __future__ import annotations

import contextlib
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


# The `tiny` preset as it was before it became a Llama trained with Muon: most tests exercise features common
# to both architectures on it, and the legacy, nanoGPT and GPT-2 exports need the gpt2 layout.
GPT2_TINY = {"arch": "gpt2", "optimizer": "adamw", "lr_schedule": "cosine"}
GPT2_TINY_FLAGS = [x for k, v in GPT2_TINY.items() for x in ("--" + k.replace("_", "-"), v)]
# A run small enough for a test: the same settings as a TrainConfig and as `openllm train` options.
SMALL_RUN = {
    **GPT2_TINY,
    "batch_size": 4,
    "seq_len": 32,
    "max_steps": 6,
    "eval_every": 3,
    "save_every": 3,
    "eval_batches": 2,
    "warmup_steps": 1,
}


def small_config(dataset, out, **changes):
    """A TrainConfig for a small run on ``dataset`` into ``out`` (``changes`` override SMALL_RUN)."""
    from openllm.training.config import TrainConfig

    base = {"data": str(dataset.path), "output_dir": str(out), "log_every": 100, **SMALL_RUN}
    return TrainConfig(**{**base, **changes})


def small_args(dataset, out, *extra: str) -> list[str]:
    """`openllm train` arguments for the same small run; ``extra`` options come last (and win)."""
    flags = [x for k, v in SMALL_RUN.items() for x in ("--" + k.replace("_", "-"), str(v))]
    return ["train", "--data", str(dataset.path), "--output-dir", str(out), *flags, "--sample-tokens", "0", *extra]


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


@contextlib.contextmanager
def live_server(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def random_model_app(dataset, max_tokens: int = 64, **shape):
    """An OpenLLM server app around a randomly initialised model with the dataset's tokenizer."""
    import torch

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel
    from openllm.inference.server import ServerLimits, create_app
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    tok = load_tokenizer(dataset.path)
    torch.manual_seed(0)
    config = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, **shape}
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, dropout=0.0, **config)).eval()
    return create_app(
        LoadedModel(model, tok, dataset.path), "tiny-test", ServerLimits(max_tokens=max_tokens, max_queue=80)
    )


@pytest.fixture(scope="module")
def server(small_dataset):
    """A live OpenLLM server (tiny random model) on a free loopback port: (base url, app)."""
    app = random_model_app(small_dataset)
    with live_server(app) as url:
        yield url, app
