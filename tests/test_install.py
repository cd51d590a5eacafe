"""A real install: the wheel built from the source tree, installed (not editable) into a fresh virtual
environment, runs prepare, a few training steps of the tiny preset, and a server that shows its page.

Offline and fast: the fresh environment gets the dependencies this test runs with (installed by
scripts/setup.sh from constraints.txt) as links, not copies; then pip installs the wheel into it with
``-c constraints.txt --no-index`` and no configuration, resolving every requirement of the wheel (and its
``serve`` extra) against them. A requirement the constraints do not satisfy fails there instead of being
fetched. Installing torch afresh would add minutes of unpacking and prove nothing about OpenLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def build_wheel(tmp: Path, env: dict) -> Path:
    """The wheel of a copy of the source tree (what a checkout holds: no build leftovers in the original)."""
    src = tmp / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp / "dist", src, env=env)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("openllm_toolkit-*.whl")
    return wheel


def fresh_environment(where: Path) -> Path:
    """A new virtual environment whose site-packages links every distribution of this one but OpenLLM."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    target = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    for site in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        for entry in Path(site).iterdir():
            if "openllm" in entry.name.lower() or entry.name.startswith("__editable__"):
                continue  # this checkout's editable install
            if not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_wheel_installs_and_prepares_trains_and_serves(small_corpus, tmp_path):
    # no pip configuration (find-links, extra indexes) and no source tree on the path: only what is given
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    wheel = build_wheel(tmp_path, env)
    python = fresh_environment(tmp_path / "venv")
    run(python, "-m", "pip", "install", "-q", "--no-index", "-c", ROOT / "constraints.txt", f"{wheel}[serve]", env=env)

    work = tmp_path / "work"  # away from the checkout, so that nothing imports from it
    work.mkdir()
    where = run(python, "-c", "import openllm; print(openllm.__file__)", cwd=work, env=env).stdout.strip()
    site = tmp_path / "venv" / "lib"
    assert Path(where).is_relative_to(site) and not Path(where).is_symlink(), where
    page = Path(where).parent / "inference" / "static" / "index.html"
    assert page.read_bytes() == (ROOT / "src" / "openllm" / "inference" / "static" / "index.html").read_bytes()

    openllm = tmp_path / "venv" / "bin" / "openllm"
    run(openllm, "prepare", "--input", small_corpus, "--output-dir", "data", "--vocab-size", "420", "--workers", "1",
        cwd=work, env=env)  # fmt: skip
    trained = run(openllm, "train", "--data", "data", "--output-dir", "run", "--model-size", "tiny",
                  "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
                  "--eval-batches", "1", "--sample-tokens", "0", cwd=work, env=env)  # fmt: skip
    assert "done" in trained.stdout, trained.stdout
    final = json.loads((work / "run" / "training_log.json").read_text())
    assert [r["step"] for r in final] == [1, 2, 3]

    port = free_port()
    server = subprocess.Popen(
        [str(openllm), "serve", "--model", "run", "--port", str(port), "--max-tokens", "8"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            time.sleep(0.2)
        home = httpx.get(url + "/", timeout=30)
        template = page.read_text(encoding="utf-8").split("{{MODEL}}")  # the server fills in the model's name
        assert home.status_code == 200 and home.text == "run".join(template), home.text[:300]
        answer = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert isinstance(choice["text"], str) and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
