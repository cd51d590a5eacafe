"""Shared fixtures: small corpora written by the tests and the real texts in ../shared/data."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests import clirunner

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BUNDLED = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


# The longest tests (none uses a module-scoped fixture), started first: with two xdist workers, longest-first
# keeps one worker from running a minute-long test alone at the end. A name that no longer exists only loses
# its place; the rest keep their order.
LONGEST_FIRST = (
    "tests/test_distributed.py::test_ddp_and_fsdp_match_one_process_and_resume_on_any_number_of_processes",
    "tests/test_faults.py::test_sigkill_sample_resumes_bit_identically",
    "tests/test_install.py::test_the_wheel_installs_and_prepares_trains_and_serves",
    "tests/test_benchmarks.py::test_gpu_check_smoke_runs_every_path_on_the_cpu",
    "tests/test_train.py::test_sigkill_in_mid_save_leaves_previous_checkpoints_and_resume_finishes",
    "tests/test_benchmarks.py::test_throughput_benchmark_runs_and_writes_its_section",
    "tests/test_readme.py::test_the_python_example_runs",
    "tests/test_benchmarks.py::test_finetune_chat_benchmark_smoke_scores_before_and_after",
    "tests/test_finetune.py::test_a_killed_finetune_resumes_bit_identically",
    "tests/test_benchmarks.py::test_lora_memory_benchmark_smoke_prints_both_modes_and_their_ratios",
    "tests/test_trackers.py::test_trackers_hold_each_step_once_through_a_kill_and_resume",  # (of NEEDS_EXTRAS)
    "tests/test_lm_eval.py::test_tasks_that_cannot_run_are_one_line",
    "tests/test_lm_eval.py::test_in_process_tasks_equal_hf_on_the_export",
)

# No test reaches the network: `datasets` (under lm-evaluation-harness) reads only its cache, here and in every
# command a test starts (set before anything imports it).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# The tests of the harness and the trackers, whose libraries scripts/test.sh installs while the others run: last.
NEEDS_EXTRAS = ("tests/test_lm_eval.py", "tests/test_trackers.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    last = len(rank) + 1
    items.sort(
        key=lambda item: (
            last if item.nodeid.startswith(NEEDS_EXTRAS) else rank.get(item.nodeid.split("[")[0], len(rank))
        )
    )


@pytest.fixture(autouse=True)
def _extras_installed(request) -> None:
    """Under scripts/test.sh, a test of NEEDS_EXTRAS waits until the background install of the rest of the test
    extra has finished (and fails if it failed)."""
    status = os.environ.get("OPENLLM_TEST_EXTRAS_STATUS")
    if not status or not request.node.nodeid.startswith(NEEDS_EXTRAS):
        return
    import time

    deadline = time.monotonic() + 900
    while not os.path.exists(status):
        if time.monotonic() > deadline:
            pytest.fail("the test extras did not finish installing in 15 minutes")
        time.sleep(1)
    with open(status) as f:
        if f.read().strip() != "0":
            pytest.fail("installing the test extras failed (scripts/test.sh prints its log)")
    import importlib

    importlib.invalidate_caches()  # (the packages appeared after this process started)


def quiet(_message: str) -> None:
    """A log function that prints nothing (training's chatter stays out of test output)."""


def cli(*args: str, env: dict | None = None, cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m openllm ARGS`` in a process of its own, as a user would; returns the finished process
    (text output). The process is forked from one that has imported torch already (tests/clirunner.py)."""
    return clirunner.run(list(args), dict(os.environ, **(env or {})), cwd=cwd, timeout=timeout)


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory ``build(directory)`` fills once per test session, however many xdist workers run it: it
    lies beside the workers' own temporary roots, and the first worker to ask builds it while the others wait
    on a lock. What is built here is read-only for the tests (they copy what they change)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    target, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not done.is_file():
            shutil.rmtree(target, ignore_errors=True)  # a build that failed half-way
            target.mkdir()
            build(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~300 paragraphs cut from Shakespeare: enough for a tokenizer of a few hundred entries."""

    def write(directory: Path) -> None:
        text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
        paras = [p for p in text.split("\n\n") if p.strip()][:400]
        (directory / "small.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")

    return built_once(tmp_path_factory, "corpus", write) / "small.txt"


@pytest.fixture(scope="session")
def small_dataset(small_corpus, tmp_path_factory):
    from openllm.data.dataset import load_dataset
    from openllm.data.prepare import prepare_dataset

    def prepare(directory: Path) -> None:
        prepare_dataset([small_corpus], directory / "small", vocab_size=420)

    return load_dataset(built_once(tmp_path_factory, "ds", prepare) / "small")


@pytest.fixture(scope="session")
def trained_run(small_dataset, tmp_path_factory) -> Path:
    """A finished small run (SMALL_RUN: GPT-2 layout, 6 steps, checkpoints at 3 and 6), shared read-only."""
    from openllm.training.loop import train

    def run(directory: Path) -> None:
        train(small_config(small_dataset, directory / "run"), log=quiet)

    return built_once(tmp_path_factory, "trained-run", run) / "run"


@pytest.fixture(scope="session")
def llama_run(small_dataset, tmp_path_factory) -> Path:
    """The same small run with the Llama layout (what GGUF export needs), shared read-only."""
    from openllm.training.loop import train

    def run(directory: Path) -> None:
        train(small_config(small_dataset, directory / "run", arch="llama"), log=quiet)

    return built_once(tmp_path_factory, "llama-run", run) / "run"


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
