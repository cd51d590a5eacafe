import math
import subprocess
import sys

import pytest
import torch

from openllm.core.errors import OpenLLMError
from openllm.model import build_model
from openllm.model.config import PRESETS, ModelConfig, model_config_for
from openllm.model.gpt import GPT

# every architecture, and llama with each of its options away from the default
ARCHS = {
    "gpt2": {},
    "llama": dict(arch="llama", bias=False),
    "llama-gqa-qknorm-untied": dict(arch="llama", bias=False, n_kv_head=1, qk_norm=True, tie_embeddings=False),
    "qwen2-gqa": dict(arch="qwen2", bias=True, n_kv_head=1),
}


@pytest.mark.parametrize("name,expected", [("small", 35_823_616), ("medium", 111_204_864), ("large", 337_176_576)])
def test_legacy_parameter_counts(name, expected):
    with torch.device("meta"):
        model = GPT(model_config_for(name, vocab_size=32000))
    assert model.num_parameters() == expected


def test_shape_checks_build_every_architecture_without_importing_the_compiler():
    # the meta kernels of normal_/arange import torch._dynamo (2 s) on first use; every checkpoint load runs
    # these shape checks, so they must not reach them
    code = (
        "import sys; from openllm.checkpoint.format import expected_shapes; from openllm.model.config import PRESETS\n"
        "shapes = [expected_shapes(p.model.to_dict()) for p in PRESETS.values()]\n"
        "assert shapes[0]['model.embed_tokens.weight'] == (1024, 128), shapes[0]\n"
        "print('torch._dynamo' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)


def tiny_config(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=24, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_later_tokens_never_change_earlier_logits(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(**ARCHS[arch])).eval()
    x = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        base, _ = model(x)
        for cut in (0, 5, 17, 23):
            y = x.clone()
            y[:, cut:] = torch.randint(0, 97, y[:, cut:].shape)
            y[:, cut] = (x[:, cut] + 1) % 97  # surely different at the cut
            changed, _ = model(y)
            assert torch.equal(base[:, :cut], changed[:, :cut])
            assert not torch.allclose(base[:, cut], changed[:, cut])


def test_state_dict_layout_matches_legacy_keys_without_mask_buffers():
    model = GPT(tiny_config())
    keys = set(model.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in keys and "lm_head.weight" in keys
    assert not any(k.endswith(".attn.bias") for k in keys)
    sd = model.state_dict()
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # (out, in), not Conv1D
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=512, n_layer=8, n_head=4, n_embd=256, block_size=64))
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_at_init_is_near_uniform(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(**ARCHS[arch]))
    x, y = torch.randint(0, 97, (2, 4, 24))
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(97)) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_full_forward(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(**ARCHS[arch])).eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(slots=2)
        steps = [model.forward_cached(x[:, :7], cache)]
        steps.append(model.forward_cached(x[:, 7:12], cache))  # a chunk after a cache
        for t in range(12, 20):
            steps.append(model.forward_cached(x[:, t : t + 1], cache))
    assert cache.lengths == [20, 20]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_different_lengths_decode_together_as_they_would_alone(arch):
    """The server's continuous batching: each slot is prefilled alone, then all decode in one batched step."""
    torch.manual_seed(0)
    model = build_model(tiny_config(**ARCHS[arch])).eval()
    prompts = [torch.randint(0, 97, (1, n)) for n in (3, 11, 6)]
    nxt = torch.randint(0, 97, (3, 2))
    with torch.no_grad():
        cache = model.new_cache(slots=3)
        for i, p in enumerate(prompts):
            view = cache.slot(i)
            model.forward_cached(p, view)
            cache.commit_slot(i, view)
        batched = [model.forward_cached(nxt[:, t : t + 1], cache) for t in range(2)]
        for i, p in enumerate(prompts):
            alone, _ = model(torch.cat([p, nxt[i : i + 1]], 1))
            for t in range(2):
                assert torch.allclose(batched[t][i, 0], alone[0, p.size(1) + t], atol=1e-5)
        cache.move(2, 0)  # a finished row's slot refilled by another row: it carries on unchanged
        moved = model.forward_cached(nxt[2:3, :1], cache.slot(0))
        alone, _ = model(torch.cat([prompts[2], nxt[2:3], nxt[2:3, :1]], 1))
        assert torch.allclose(moved[0, 0], alone[0, -1], atol=1e-5)


def test_context_overflow_is_an_error():
    model = GPT(tiny_config())
    with pytest.raises(ValueError):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_bad_config_values_are_clear_errors():
    with pytest.raises(OpenLLMError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(OpenLLMError, match="n_layer"):
        ModelConfig(n_layer=0)


def test_every_preset_builds_and_tiny_is_cpu_sized():
    assert set(PRESETS) >= {"tiny", "small", "medium", "large"}
    tiny = build_model(PRESETS["tiny"].model)
    assert tiny.num_parameters() < 2_000_000 and PRESETS["tiny"].model.arch == "llama"
    assert all(p.model.arch == "gpt2" for name, p in PRESETS.items() if name != "tiny")  # the legacy shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(dropout=0.0, **ARCHS[arch]))
    x, y = torch.randint(0, 97, (2, 2, 24))
    _, plain = model(x, y)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    _, ckpt = model(x, y)
    ckpt.backward()
    assert torch.equal(plain, ckpt)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_flops_per_token_counts_matrices_and_attention():
    model = GPT(tiny_config())
    n = model.num_parameters(exclude_embeddings=True)
    assert model.flops_per_token(24) == 6 * n + 12 * 2 * 32 * 24
