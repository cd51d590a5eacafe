"""Where and in what precision the model runs: ``--device`` and ``--dtype`` resolution.

Shared by training and inference, so that generating, evaluating and serving never import the
training set-up.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Annotated

from openllm.core.errors import OpenLLMError
from openllm.core.options import Opt, one_of

if TYPE_CHECKING:  # torch is imported where a device is resolved, so that the CLI starts without it
    import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
DeviceOption = Annotated[str, Opt(one_of(DEVICES), choices=DEVICES)]


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise OpenLLMError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise OpenLLMError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def _cpu_flags_and_model() -> tuple[set[str], str]:
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[-1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return flags, model or platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 matmuls are faster than fp32;
    elsewhere (AVX2-only CPUs: most laptops, AMD Zen 2/3) PyTorch emulates bf16, many times slower.

    The kernel limits a user (or ``benchmarks/*.py --as-avx2``) sets are honoured: ``ATEN_CPU_CAPABILITY``
    below avx512 or ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 make bf16 emulated again."""
    flags, _ = _cpu_flags_and_model()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not isa or isa == "ALL" or any(k in isa for k in ("BF16", "AMX", "FP16", "AVX10"))


def cpu_description() -> str:
    """The processor and what PyTorch computes with on it, for the first lines of a run and benchmarks:
    e.g. "AMD EPYC, AVX2 kernels, bf16 emulated"."""
    import torch

    _, model = _cpu_flags_and_model()
    bf16 = "native bf16" if cpu_has_native_bf16() else "bf16 emulated"
    return f"{model}, {torch.backends.cpu.get_cpu_capability()} kernels, {bf16}"


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """The lowest precision that the device multiplies matrices in natively: bf16 on CUDA GPUs that have it
    and on CPUs with bf16 instructions, float32 elsewhere. Muon orthogonalises its updates in it."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def emulated_precision_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning for a precision the user forced that this processor only emulates, else None."""
    import torch

    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return (
            "warning: --dtype bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX): expect training many "
            "times slower than float32, which is the default here"
        )
    return None


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
