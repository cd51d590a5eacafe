"""``openllm`` commands for the tests, each in a process of its own, forked from a server process that has
already imported torch and the other heavy libraries (multiprocessing's forkserver).

The command meets the same process boundary as ``python -m openllm``: its own exit status (negative when a
signal killed it), its stdout and stderr captured at the file-descriptor level (what C code prints too), its
own environment, working directory and signal handlers. OpenLLM's own modules are never preloaded, so each
command imports the code under test afresh and reads its environment (``OPENLLM_FAULT`` ...) as a real start
would. What it saves is the interpreter start and the torch import, about 3 s of CPU per command, which most
of the suite's commands spend more time on than on their work.

A command whose environment changes what happens at interpreter start or while a preloaded library is
imported (``PYTHONPATH`` shims, ``ATEN_CPU_CAPABILITY``, thread counts ...: :data:`AT_START`) runs as a real
subprocess instead.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Imported once by the server; every command process inherits them already imported.
PRELOAD = ["numpy", "torch", "yaml", "sentencepiece", "tokenizers", "safetensors", "tqdm"]

# Environment variables read when the interpreter starts or while a preloaded library is imported (torch picks
# its CPU kernels and thread pools then): a command that changes one runs as a real subprocess.
AT_START = (
    "PYTHON",
    "LD_",
    "ATEN_",
    "ONEDNN_",
    "DNNL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "CUDA_",
    "TORCH_",
    "PYTORCH_",
)

_context = None
_baseline: dict[str, str] = {}


def _server():
    global _context, _baseline
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        _baseline = dict(os.environ)
    return _context


def _forkable(env: dict[str, str]) -> bool:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    base = _baseline if _context is not None else os.environ
    changed = {k for k in env.keys() | base.keys() if env.get(k) != base.get(k)}
    return not any(k.startswith(AT_START) for k in changed)


def _command(args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str) -> None:
    """The command process: the environment, directory, signals and output files of a fresh start, then
    ``python -m openllm ARGS`` (its exit status is the process's)."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(out, "w") as o, open(err, "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.argv = [str(Path(__file__).parents[1] / "src" / "openllm" / "__main__.py"), *args]
    code: int = 0
    try:
        from openllm.cli import entry

        entry()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # as the interpreter would: the traceback, status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Command:
    """A started command, with the part of :class:`subprocess.Popen`'s interface the tests use: ``pid``,
    ``poll()``, ``wait(timeout)``, ``send_signal()``, ``kill()``, ``returncode``, ``communicate()``, and
    ``stdout``/``stderr`` as files to read once it has ended."""

    def __init__(self, args: list[str], env: dict[str, str], cwd=None):
        self.args = ["openllm", *args]
        self._tmp = tempfile.TemporaryDirectory(prefix="openllm-cli-")
        self._out, self._err = os.path.join(self._tmp.name, "stdout"), os.path.join(self._tmp.name, "stderr")
        cwd = None if cwd is None else str(cwd)
        self._proc = _server().Process(target=_command, args=(list(args), env, cwd, self._out, self._err))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()

    def _read(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8", errors="backslashreplace") if os.path.exists(path) else ""

    @property
    def stdout(self) -> io.StringIO:
        return io.StringIO(self._read(self._out))

    @property
    def stderr(self) -> io.StringIO:
        return io.StringIO(self._read(self._err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._read(self._out), self._read(self._err)

    def __del__(self) -> None:
        self._tmp.cleanup()


def start(args: list[str], env: dict[str, str], cwd=None) -> Command | subprocess.Popen:
    """``python -m openllm ARGS`` started (text output, both streams captured), as :class:`subprocess.Popen`
    would start it."""
    if not _forkable(env):
        return subprocess.Popen(
            [sys.executable, "-m", "openllm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=cwd,
        )  # fmt: skip
    return Command(args, env, cwd)


def run(args: list[str], env: dict[str, str], cwd=None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python -m openllm ARGS`` as :func:`subprocess.run` would report it (text output)."""
    if not _forkable(env):
        return subprocess.run(
            [sys.executable, "-m", "openllm", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    command = Command(args, env, cwd)
    try:
        command.wait(timeout)
    except subprocess.TimeoutExpired:
        command.kill()
        command.wait()
        raise
    out, err = command.communicate()
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)
