"""Shared by the benchmark scripts: replace one section of docs/benchmarks.md, keeping the others; say which
processor and kernels ran, and run as an AVX2-only CPU on request."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def write_section(path: str | Path, heading: str, text: str) -> None:
    """Put ``text`` (which starts with the ``## heading`` line) in place of the section of that heading."""
    path = Path(path)
    doc = path.read_text() if path.is_file() else "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`.\n"
    start = doc.find(f"## {heading}")
    if start >= 0:
        end = doc.find("\n## ", start + 1)
        doc = doc[:start] + (doc[end + 1 :] if end >= 0 else "")
    path.write_text(doc.rstrip() + "\n\n" + text.rstrip() + "\n")


def publish(path: str | Path, heading: str, lines: list[str]) -> None:
    """Print a benchmark's record and put it in its section of ``path`` (see :func:`write_section`)."""
    text = "\n".join(lines)
    print(text)
    write_section(path, heading, text)
    print(f"wrote {path}")


# What an AVX2-only CPU (most laptops, AMD Zen 2/3) computes with, imposed on a bigger one: ATen's vector
# kernels and oneDNN's both capped at AVX2, which also makes bf16 emulated (openllm.core.device).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

_KERNELS = """
import torch
from openllm.core.device import cpu_description
print(cpu_description())
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    torch.randn(4, 4).to_mkldnn().to_dense()  # one oneDNN primitive: it prints the instruction set it uses
"""


def add_cpu_kind_option(parser) -> None:
    parser.add_argument(
        "--as-avx2",
        action="store_true",
        help="run the whole comparison as an AVX2-only CPU would (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; "
        "the kernels really used are printed)",
    )


def apply_cpu_kind(args) -> None:
    """With ``--as-avx2``, start this script again with the kernel limits in its environment, so that this
    process and every one it starts compute as an AVX2-only CPU."""
    if args.as_avx2 and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})


def processor() -> str:
    """The processor and the kernels a process started with this environment really uses: its model,
    ATen's CPU capability, oneDNN's instruction set (from oneDNN's own verbose line) and bf16."""
    r = subprocess.run([sys.executable, "-c", _KERNELS], capture_output=True, text=True, check=True)
    lines = (r.stdout + r.stderr).splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), "unused")
    limits = " ".join(f"{k}={os.environ[k]}" for k in AVX2_ONLY if k in os.environ)
    return f"{lines[0]}, oneDNN {isa}" + (f" (limited by {limits})" if limits else "")


@contextlib.contextmanager
def server_process(script: str, *args: str):
    """``python SCRIPT --port P ARGS`` (a benchmark's own server mode) on a free port of 127.0.0.1, started and
    waited for until ``/health`` answers; yields (its URL, its pid) and stops it at the end."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, script, "--port", str(port), *args])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the server process exited with status {proc.returncode} before answering")
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
