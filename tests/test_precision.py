"""Precision follows what the processor computes fast: Muon's orthogonalisation, autocast, and the warnings."""

import pytest
import torch

from openllm.core import device as dev
from openllm.training.loop import train
from openllm.training.optim import Muon, configure_optimizer, orthogonalise
from tests.conftest import small_config as config

NS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's coefficients
AMX_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


def fake_cpu(monkeypatch, flags, model="Test CPU"):
    monkeypatch.setattr(dev, "_cpu_flags_and_model", lambda: (set(flags), model))


@pytest.mark.parametrize(
    "flags, env, native",
    [
        ({"avx2", "fma"}, {}, False),  # AMD Zen 2/3, most laptops
        ({"avx2", "avx512f"}, {}, False),  # AVX-512 without bf16 instructions
        (AMX_FLAGS, {}, True),
        (AMX_FLAGS, {"ATEN_CPU_CAPABILITY": "avx2"}, False),  # run as an AVX2-only CPU would
        (AMX_FLAGS, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        (AMX_FLAGS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
    ],
)
def test_native_bf16_follows_the_cpu_and_the_kernel_limits(monkeypatch, flags, env, native):
    for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fake_cpu(monkeypatch, flags)
    cpu = torch.device("cpu")
    assert dev.cpu_has_native_bf16() is native
    assert dev.fast_matmul_dtype(cpu) == (torch.bfloat16 if native else torch.float32)
    warning = dev.emulated_precision_warning(torch.bfloat16, cpu)
    assert (warning is None) is native
    if warning:
        assert "--dtype bfloat16 is emulated" in warning
    assert dev.emulated_precision_warning(torch.float32, cpu) is None
    assert ("native bf16" if native else "bf16 emulated") in dev.cpu_description()


@pytest.mark.parametrize("native", [False, True])
def test_muon_orthogonalises_in_the_devices_fast_precision(monkeypatch, small_dataset, tmp_path, native):
    fake_cpu(monkeypatch, AMX_FLAGS if native else {"avx2"})
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    from openllm.model import build_model
    from openllm.model.config import model_config_for

    model = build_model(model_config_for("tiny", vocab_size=64))
    cfg = config(small_dataset, tmp_path, optimizer="muon").resolved()
    opt = configure_optimizer(model, cfg.optimization, cfg.learning_rate, torch.device("cpu"))
    assert opt.parts["muon"].ns_dtype == (torch.bfloat16 if native else torch.float32)


def run_muon(make, steps=4):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(96, 32)), torch.nn.Parameter(torch.randn(32, 96))]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt


def test_muon_in_bf16_is_pytorchs_bit_for_bit_and_float32_agrees():
    kw = dict(lr=6e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    reference, ref_opt = run_muon(lambda ps: torch.optim.Muon(ps, **kw))
    bf16, bf16_opt = run_muon(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw))
    fp32, _ = run_muon(lambda ps: Muon(ps, ns_dtype=torch.float32, **kw))
    assert all(torch.equal(a, b) for a, b in zip(reference, bf16, strict=True))
    # the state is PyTorch's: one state dict loads into the other
    assert bf16_opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    # bf16 keeps 8 significant bits (relative rounding 2**-8 = 0.4%); an update moves each weight by at most
    # about lr * 0.2 * sqrt(96) ~ 0.012 per step, so after 4 steps the two differ by a few percent of 0.05
    for a, b in zip(reference, fp32, strict=True):
        assert (a - b).abs().max().item() < 0.05 * 4 * 6e-3 * 0.2 * 96**0.5
        assert not torch.equal(a, b)  # float32 really ran


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_orthogonalisation_agrees_across_precisions(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x32 = orthogonalise(g, NS, 5, 1e-7, torch.float32)
    x16 = orthogonalise(g, NS, 5, 1e-7, torch.bfloat16)
    assert x32.dtype == torch.float32 and x16.dtype == torch.bfloat16 and x32.shape == g.shape
    # five quintic steps put the singular values in about (0.5, 1.5), in either precision
    for x in (x32, x16.float()):
        s = torch.linalg.svdvals(x)
        assert 0.4 < s.min().item() and s.max().item() < 1.6
    assert ((x32 - x16.float()).norm() / x32.norm()).item() < 0.05  # bf16 rounding, compounded over 5 steps
    before = g.clone()
    orthogonalise(g, NS, 5, 1e-7, torch.float32)
    assert torch.equal(g, before)  # never in place (g may be the momentum buffer)


def test_train_says_its_precision_and_warns_about_emulated_bf16(monkeypatch, small_dataset, tmp_path):
    fake_cpu(monkeypatch, {"avx2"}, "Some AVX2 CPU")
    lines: list[str] = []
    train(config(small_dataset, tmp_path / "run", max_steps=1, optimizer="muon", dtype="bfloat16"), log=lines.append)
    text = "\n".join(lines)
    assert "warning: --dtype bfloat16 is emulated on this CPU" in text
    precision = next(x for x in lines if x.startswith("precision:"))
    assert "bfloat16 autocast" in precision and "Muon orthogonalises in float32" in precision
    assert "Some AVX2 CPU" in precision and "bf16 emulated" in precision
