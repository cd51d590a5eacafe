"""Where and in what precision the model runs: ``--device`` and ``--dtype`` resolution.

Shared by training and inference, so that generating, evaluating and serving never import the
training set-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from openllm.core.errors import OpenLLMError
from openllm.core.options import Opt

if TYPE_CHECKING:  # torch is imported where a device is resolved, so that the CLI starts without it
    import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
DeviceOption = Annotated[str, Opt("auto, cpu or cuda", choices=DEVICES)]


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise OpenLLMError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise OpenLLMError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | None, device: torch.device, cpu_default: str = "float32") -> torch.dtype:
    """The autocast dtype: as asked, else bf16 on CUDA GPUs that have it, else the preset's CPU default
    where the CPU has native bf16, else float32."""
    import torch

    if name is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        name = cpu_default if cpu_has_native_bf16() else "float32"
    if name == "float16" and device.type != "cuda":
        raise OpenLLMError("--dtype float16 needs a CUDA GPU; use float32 or bfloat16 on the CPU")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
