"""Where a run ran: the machine (processor, core count, GPUs), the library versions and the project's commit, as
a run directory's ``environment.json`` records them for its report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

LIBRARIES = ("torch", "numpy", "sentencepiece", "tokenizers", "safetensors", "transformers", "gguf", "pyarrow")


def describe_environment() -> dict:
    """This process's machine, libraries and commit (``commit`` None outside a git checkout)."""
    import torch

    from openllm import __version__
    from openllm.core.device import cpu_description

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    versions = {"python": platform.python_version(), "openllm": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_description(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python_executable": sys.executable,
        "libraries": versions,
        **project_commit(),
    }


def project_commit() -> dict:
    """``commit`` (and whether the work tree had uncommitted changes, ``dirty``) of the checkout OpenLLM runs from;
    None for an installed package."""
    root = Path(__file__).resolve().parents[3]  # src/openllm/core/environment.py -> the checkout
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
