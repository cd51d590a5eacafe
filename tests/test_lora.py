"""LoRA adapters (model/lora.py): exact at the start, only adapters train, merging is the same function, adapters
round-trip strictly, a LoRA checkpoint names and checks its base, and every command gets plain merged weights."""

import shutil
import subprocess
import sys

import pytest
import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint.state import RunState
from openllm.core.errors import OpenLLMError
from openllm.model import build_model
from openllm.model.config import model_config_for
from openllm.model.lora import (
    LoRAConfig,
    adapter_state_dict,
    apply_lora,
    base_sha256,
    load_adapters,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
)

ARCHS = ("gpt2", "llama")
ALL = ("q", "k", "v", "o", "up", "down")  # the targets both architectures have


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config_for("tiny", vocab_size=64, arch=arch, n_layer=2, n_embd=32, n_head=4)).eval()


def randomise_adapters(model, seed: int = 1) -> None:
    """B is zero at the start: give every adapter values, so that merging has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def tokens(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_model_computes_exactly_what_the_base_does_at_the_start(arch):
    model, idx = tiny(arch), tokens()
    base_logits = model(idx)[0]
    cache = model.new_cache(2)
    base_cached = model.forward_cached(idx, cache)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.5, targets=ALL))
    for mode in (model.eval, model.train):  # (the adapters' dropout acts on a zero update: no effect either way)
        mode()
        assert torch.equal(model(idx)[0], base_logits)
    model.eval()
    assert torch.equal(model.forward_cached(idx, model.new_cache(2)), base_cached)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_the_adapters_take_gradients_and_a_few_steps_change_only_them(arch):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=2, targets=("q", "v")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == set(adapter_state_dict(model))
    decay, no_decay = model.optimizer_groups()  # what the trainer's optimizer is built from: adapters only
    assert set(decay) | set(no_decay) == trainable
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in decay], lr=1e-2)
    model.train()
    for _ in range(3):
        idx = tokens(16)
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the frozen {k} changed"
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if ".lora_B." in k)


@pytest.mark.parametrize("arch", ARCHS)
def test_merging_computes_what_the_adapters_do_and_gives_the_plain_keys(arch):
    model, idx = tiny(arch), tokens()
    plain_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(rank=3, targets=("q", "k", "v", "o", "up", "down")))
    randomise_adapters(model)
    adapted = model(idx)[0]
    assert not torch.allclose(adapted, tiny(arch)(idx)[0], atol=1e-4)  # the adapters do change the function
    state = merged_state_dict(model)
    assert list(state) == plain_keys
    fresh = tiny(arch, seed=5)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(idx)[0], adapted, atol=1e-5)
    merge_lora(model)
    assert list(model.state_dict()) == plain_keys and all(p.requires_grad for p in model.parameters())
    assert type(model.blocks[0].mlp).__name__ == "MLP" and all(
        type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "c_attn", "c_fc"))
    )
    assert torch.allclose(model(idx)[0], adapted, atol=1e-5)
    logits = model.forward_cached(idx, model.new_cache(2))
    assert torch.allclose(logits, adapted, atol=1e-5)


def test_gpt2_fused_attention_adapts_q_k_v_as_separate_slices():
    model = tiny("gpt2")
    apply_lora(model, LoRAConfig(rank=2, targets="v,q"))  # any order: kept in q, k, v, ... order
    keys = list(adapter_state_dict(model))
    assert keys[:4] == [f"transformer.h.0.attn.c_attn.lora_{m}.{t}" for m in "AB" for t in "qv"]
    randomise_adapters(model)
    delta = (
        merged_state_dict(model)["transformer.h.0.attn.c_attn.weight"]
        - tiny("gpt2").state_dict()["transformer.h.0.attn.c_attn.weight"]
    )
    rows = delta.abs().sum(dim=1).view(3, -1)  # the q, k and v thirds of c_attn's output rows
    assert (rows[0] > 0).all() and (rows[1] == 0).all() and (rows[2] > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_round_trip_and_load_strictly(arch):
    import io

    config = LoRAConfig(rank=2, alpha=4, targets=("q", "v", "down"))
    model, idx = tiny(arch), tokens()
    apply_lora(model, config)
    randomise_adapters(model)
    buf = io.BytesIO()
    torch.save(adapter_state_dict(model), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    other = tiny(arch)
    apply_lora(other, config)
    load_adapters(other, saved)
    assert torch.equal(other(idx)[0], model(idx)[0])
    key = next(iter(saved))
    before = {k: v.clone() for k, v in adapter_state_dict(other).items()}
    for bad, words in (
        ({k: v for k, v in saved.items() if k != key}, "1 tensors missing"),
        ({**saved, "blocks.9.lora_A.q": saved[key]}, "1 unexpected tensors"),
        ({**saved, key: saved[key][:1]}, f"{key} has shape"),
    ):
        with pytest.raises(OpenLLMError, match=f"the LoRA adapters do not fit this model: .*{words}"):
            load_adapters(other, bad)
    assert all(torch.equal(adapter_state_dict(other)[k], v) for k, v in before.items())  # nothing half-copied
    with pytest.raises(OpenLLMError, match="no LoRA adapters to load into"):
        load_adapters(tiny(arch), saved)


def test_an_unfrozen_base_tensor_is_kept_whole_beside_the_adapters():
    model = tiny("llama")
    apply_lora(model, LoRAConfig(rank=2))
    model.model["embed_tokens"].weight.requires_grad_(True)  # what a trainer growing the vocabulary would do
    keys = set(lora_state_dict(model))
    assert keys == set(adapter_state_dict(model)) | {"model.embed_tokens.weight", "lm_head.weight"}


def test_base_hash_is_the_weights_only_and_the_same_in_another_process():
    model = tiny("llama")
    digest = base_sha256(model)
    assert digest == base_sha256(model.state_dict()) and digest.startswith("sha256:")
    apply_lora(model, LoRAConfig(rank=2))
    randomise_adapters(model)
    assert base_sha256(model) == digest  # the adapters are not the base
    code = (
        "import torch; from openllm.model import build_model; from openllm.model.config import model_config_for\n"
        "from openllm.model.lora import base_sha256\ntorch.manual_seed(0)\n"
        "print(base_sha256(build_model(model_config_for('tiny', vocab_size=64, arch='llama', n_layer=2, n_embd=32, "
        "n_head=4))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == digest, r.stderr
    changed = tiny("llama").state_dict()
    changed["model.norm.weight"][0] += 1e-3
    assert base_sha256(changed) != digest


@pytest.mark.parametrize(
    "options,words",
    [
        ({"rank": 0}, "--lora-rank must be between 1 and"),
        ({"rank": -3}, "--lora-rank must be between 1 and"),
        ({"rank": 2.5}, "--lora-rank must be a whole number"),
        ({"rank": True}, "--lora-rank must be a whole number"),
        ({"alpha": 0}, "--lora-alpha must be a positive number"),
        ({"alpha": float("nan")}, "--lora-alpha must be a number"),
        ({"alpha": "16"}, "--lora-alpha must be a number"),
        ({"dropout": 1.0}, "--lora-dropout must be at least 0 and below 1"),
        ({"dropout": -0.1}, "--lora-dropout must be at least 0 and below 1"),
        ({"targets": ""}, "--lora-targets names no matrix"),
        ({"targets": ("",)}, "--lora-targets names no matrix"),
        ({"targets": "q,x"}, "--lora-targets: unknown target 'x'"),
        ({"targets": ("q", "q")}, "--lora-targets names q twice"),
        ({"targets": 3}, "--lora-targets must be a comma-separated list"),
    ],
)
def test_bad_lora_options_are_refused_by_name(options, words):
    with pytest.raises(OpenLLMError, match=words.replace("(", r"\(")):
        LoRAConfig(**options)


def test_what_a_model_cannot_take_is_refused_by_name():
    with pytest.raises(OpenLLMError, match="--lora-targets: arch gpt2 has no gate matrix"):
        apply_lora(tiny("gpt2"), LoRAConfig(targets="gate"))
    with pytest.raises(OpenLLMError, match=r"--lora-rank 64 exceeds the q matrix of this model \(32 x 32\)"):
        apply_lora(tiny("llama"), LoRAConfig(rank=64))
    model = tiny("llama")
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(OpenLLMError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
    for bad in ({"rank": 2}, {"rank": 2, "alpha": 1, "dropout": 0, "targets": ["q"], "extra": 1}, [1]):
        with pytest.raises(OpenLLMError, match="LoRA config"):
            LoRAConfig.from_dict(bad)
    assert LoRAConfig.from_dict(LoRAConfig(targets="v,q").to_dict()) == LoRAConfig(targets=("q", "v"))


# ------------------------------------------------------------------------- checkpoints


def lora_checkpoint(run, directory, config=LoRAConfig(rank=2, alpha=4, targets=("q", "v", "up"))):
    """A LoRA checkpoint written through format.py over a copy of ``run``'s best model (base.pt, beside the run's
    tokenizer in ``directory``), with adapters that change the model; returns (its path, the merged model)."""
    from openllm.inference.loading import model_from_checkpoint

    directory.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.suffix != ".pt":
            shutil.copy(f, directory / f.name)
    shutil.copy(run / "best_model.pt", directory / "base.pt")
    model = model_from_checkpoint(ck.load_checkpoint(directory / "base.pt"), "base")
    digest = base_sha256(model)
    apply_lora(model, config)
    randomise_adapters(model)
    ckpt = ck.build_checkpoint(
        model_state=lora_state_dict(model),
        optimizer_state={},
        state=RunState(),
        model_config=model.config,
        training_config={},
        model_info={},
        scheduler={},
        training_stats={},
        epoch=0,
        tokenizer_sha256=None,
        dataset_fingerprint=None,
        provenance={"source": "a LoRA test"},
        lora=ck.lora_record(config, directory / "base.pt", digest),
    )
    ck.save_checkpoint(ckpt, directory / "lora.pt")
    merge_lora(model)
    return directory / "lora.pt", model.eval()


def test_a_lora_checkpoint_verifies_inspects_loads_and_exports_merged(trained_run, tmp_path):
    from openllm.inference.loading import load_model
    from openllm.interop.export import export_checkpoint
    from openllm.interop.hf import load_hf_model
    from openllm.interop.inspect import describe, format_description

    path, merged = lora_checkpoint(trained_run, tmp_path / "lora")
    saved = ck.load_checkpoint(path)
    assert set(ck.read_info(saved).model_state or {}) == {k for k in saved["model_state_dict"] if ".lora_" in k}
    v = ck.verify_checkpoint(path)
    assert v.ok, v.problems
    text = format_description(describe(path))
    assert "with LoRA adapters" in text and "rank 2, alpha 4, dropout 0 on q,v,up" in text and "base.pt" in text
    idx = torch.randint(0, merged.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    loaded = load_model(path)
    assert torch.allclose(loaded.model(idx)[0], merged(idx)[0], atol=1e-5)
    assert list(loaded.model.state_dict()) == list(merged.state_dict())
    export_checkpoint(path, tmp_path / "hf")
    exported, _ = load_hf_model(tmp_path / "hf")
    assert torch.allclose(exported(idx)[0], merged(idx)[0], atol=1e-5)


def test_a_lora_checkpoint_exports_merged_gguf(llama_run, tmp_path):
    from gguf import GGUFReader

    from openllm.interop.export import export_checkpoint

    path, merged = lora_checkpoint(llama_run, tmp_path / "lora")
    export_checkpoint(path, tmp_path / "gguf", format="gguf", gguf_dtype="f32")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    base = ck.read_info(ck.load_checkpoint(llama_run / "best_model.pt")).model_state or {}
    for ours, theirs in (("self_attn.v_proj", "attn_v"), ("mlp.up_proj", "ffn_up")):  # (q, k: permuted rows)
        want = merged.state_dict()[f"model.layers.0.{ours}.weight"]
        got = torch.from_numpy(tensors[f"blk.0.{theirs}.weight"].data.copy()).reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, base[f"model.layers.0.{ours}.weight"])


def test_a_changed_or_missing_base_is_refused_by_name(trained_run, tmp_path):
    from openllm.inference.loading import load_model
    from openllm.interop.export import export_checkpoint
    from openllm.interop.merged import model_from_checkpoint

    path, _ = lora_checkpoint(trained_run, tmp_path / "lora")
    base = tmp_path / "lora" / "base.pt"
    other = ck.load_checkpoint(base)
    weights = ck.read_info(other).model_state or {}
    weights["transformer.ln_f.weight"][0] += 0.01  # other weights of the same shape
    ck.save_checkpoint(other, base)
    with pytest.raises(OpenLLMError, match=r"its LoRA base .*base.pt has changed since the adapters were trained"):
        load_model(path)
    with pytest.raises(OpenLLMError, match="has changed since"):
        export_checkpoint(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    base.unlink()
    v = ck.verify_checkpoint(path)
    assert not v.ok and "its LoRA base" in v.problems[0] and "is missing" in v.problems[0]
    with pytest.raises(OpenLLMError, match="its LoRA base .*is missing"):
        ck.load_verified(path, "export")
    with pytest.raises(OpenLLMError, match=r"its LoRA base .*base.pt \(sha256:.*\) is missing"):
        model_from_checkpoint(ck.load_checkpoint(path), str(path))  # (past verify: the loader's own refusal)


def test_a_lora_checkpoint_with_damaged_lora_keys_does_not_verify(trained_run, tmp_path):
    path, _ = lora_checkpoint(trained_run, tmp_path / "lora")
    for key, value, words in (
        ("lora_config", {"rank": 0, "alpha": 1, "dropout": 0, "targets": ["q"]}, "lora_config is invalid"),
        ("lora_base", {"path": str(path)}, "lora_base does not name"),
        ("lora_config", None, "lora_config is invalid"),
    ):
        ckpt = ck.load_checkpoint(path)
        ckpt[key] = value
        ck.save_checkpoint(ckpt, tmp_path / "bad.pt")  # (a fresh checksum: only the LoRA keys are wrong)
        v = ck.verify_checkpoint(tmp_path / "bad.pt")
        assert not v.ok and any(words in p for p in v.problems), v.problems
    ckpt = ck.load_checkpoint(path)
    ckpt["model_state_dict"] = {k: t for k, t in ckpt["model_state_dict"].items() if ".lora_B." not in k}
    ck.save_checkpoint(ckpt, tmp_path / "bad.pt")
    v = ck.verify_checkpoint(tmp_path / "bad.pt")
    assert not v.ok and "model_state_dict lacks" in v.problems[0], v.problems


def test_muon_over_adapters_records_its_state_though_adamw_gets_no_parameter():
    """Under Muon every adapter is a block matrix and the AdamW part is empty: the checkpoint still holds moments
    (has_optimizer_state), else a resume would start a fresh optimizer and not be exact."""
    from openllm.training.config import TrainConfig
    from openllm.training.optim import configure_optimizer

    model = tiny("llama").train()
    apply_lora(model, LoRAConfig(rank=2))
    cfg = TrainConfig(model_size="tiny", optimizer="muon").resolved()
    opt = configure_optimizer(model, cfg.optimization, 1e-3, torch.device("cpu"))
    assert not ck.has_optimizer_state(opt.state_dict())
    idx = tokens(16)
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and not state["adamw"]["state"]
    assert ck.has_optimizer_state(state)
