"""arch llama: the config's checks, training and generation through every entry point, Hugging Face
export and convert (LlamaForCausalLM, Qwen3ForCausalLM with QK-norm) with logits parity, GGUF export."""

import json

import numpy as np
import pytest
import torch

from openllm.checkpoint.format import verify_checkpoint
from openllm.core.errors import OpenLLMError
from openllm.inference.generate import SamplingOptions, generate_ids, prompt_ids
from openllm.inference.loading import load_model
from openllm.interop.convert import convert
from openllm.interop.export import export_checkpoint
from openllm.interop.gguf_file import interleave_halves
from openllm.interop.inspect import describe
from openllm.model.config import ModelConfig, model_config_for
from openllm.training.loop import train
from tests.conftest import cli, quiet, small_config

transformers = pytest.importorskip("transformers")  # a test dependency: scripts/test.sh installs it

SAMPLE = "ROMEO: But, soft! what light through yonder window breaks? 1597 — café"


def test_config_refuses_what_an_architecture_cannot_honour():
    with pytest.raises(OpenLLMError, match="qk_norm True needs arch llama"):
        ModelConfig(qk_norm=True)
    with pytest.raises(OpenLLMError, match="rope_theta"):
        ModelConfig(rope_theta=500.0)
    with pytest.raises(OpenLLMError, match="no biases"):
        ModelConfig(arch="llama")
    with pytest.raises(OpenLLMError, match="multiple of n_kv_head"):
        ModelConfig(arch="llama", bias=False, n_head=8, n_kv_head=3)
    with pytest.raises(OpenLLMError, match="arch must be one of"):
        ModelConfig(arch="mamba")
    tiny = model_config_for("tiny", arch="llama")
    assert (tiny.arch, tiny.bias, tiny.n_layer, tiny.n_embd) == ("llama", False, 2, 128)
    assert tiny.mlp_hidden % 64 == 0 and 8 * 128 / 3 <= tiny.mlp_hidden < 8 * 128 / 3 + 64


def test_llama_run_generates_and_resuming_it_as_gpt2_is_refused(llama_run, small_dataset, tmp_path):
    ckpt = torch.load(llama_run / "best_model.pt", weights_only=True)
    assert ckpt["config"]["arch"] == "llama" and ckpt["training_config"]["arch"] == "llama"
    assert ckpt["model_info"]["architecture"].startswith("Llama")
    assert verify_checkpoint(llama_run / "best_model.pt").ok
    r = cli("generate", "--model", str(llama_run), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    resume = ("train", "--resume", str(llama_run / "best_model.pt"), "--output-dir", str(llama_run / "x"))
    r = cli(*resume, "--arch", "gpt2", "--max-steps", "8")
    assert r.returncode != 0 and "arch llama, not gpt2" in r.stderr and "Traceback" not in r.stderr


def test_export_loads_as_llama_for_causal_lm_with_same_logits_and_ids(llama_run, tmp_path):
    out = tmp_path / "hf"
    r = cli("export", "--checkpoint", str(llama_run), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    info = describe(out)
    assert info["format"] == "Hugging Face Llama directory (openllm export)"
    assert info["config"]["num_hidden_layers"] == 2 and info["config"]["hidden_act"] == "silu"
    ours = load_model(llama_run)
    x = torch.randint(0, ours.model.config.vocab_size, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.model(x)[0] - model(x).logits).abs().max().item() < 1e-4
    assert hf_tok.encode(SAMPLE) == ours.tokenizer.prompt_ids(SAMPLE)
    # and back: convert the export, the weights come back unchanged
    report = convert(out, tmp_path / "back")
    assert report.kind == "openllm-export"
    a = torch.load(llama_run / "best_model.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "back" / "best_model.pt", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "model_type, extra",
    [("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0)), ("qwen3", {})],
)
def test_convert_a_hugging_face_llama_or_qwen3_directory(llama_run, tmp_path, model_type, extra):
    """A directory built by transformers itself (random weights, grouped-query attention, untied head)."""
    vocab = load_model(llama_run).tokenizer.vocab_size
    shape = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        head_dim=16,
    )
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}.get(
        model_type, (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)
    )
    torch.manual_seed(0)
    hf = cls[1](cls[0](**{**shape, **extra})).eval()
    hf.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "run", tokenizer=str(llama_run / "tokenizer.model"))
    assert report.kind == f"hf-{model_type}"
    ours = load_model(tmp_path / "run")
    config = ours.model.config
    assert config.qk_norm == (model_type == "qwen3") and config.intermediate_size == 96
    if model_type == "llama":
        assert (config.kv_heads, config.tie_embeddings, config.rope_theta) == (2, False, 500.0)
    x = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.model(x)[0] - hf(x).logits).abs().max().item() < 1e-4
    # our export of it is again the same model for transformers
    export_checkpoint(tmp_path / "run", tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max().item() < 1e-4


def test_convert_refuses_a_llama_variant_it_cannot_reproduce(llama_run, tmp_path):
    export_checkpoint(llama_run, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    cfg["hidden_act"] = "gelu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", "--input-dir", str(tmp_path / "hf"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode != 0 and "hidden_act 'gelu'" in r.stderr and "rope scaling 'yarn'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_gguf_export_holds_the_model_and_tokenizer_in_llama_cpp_layout(llama_run, tmp_path):
    import gguf

    r = cli("export", "--checkpoint", str(llama_run), "--output-dir", str(tmp_path / "g"), "--format", "gguf",
            "--gguf-dtype", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")

    def field(name):
        f = reader.fields[name]
        return f.contents()

    ours = load_model(llama_run)
    config, tok = ours.model.config, ours.tokenizer
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "llama"
    assert field("llama.block_count") == config.n_layer and field("llama.context_length") == config.block_size
    assert field("tokenizer.ggml.tokens") == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert field("tokenizer.ggml.bos_token_id") == tok.special.bos and field("tokenizer.ggml.add_bos_token") is True
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    state = ours.model.state_dict()
    assert "output.weight" not in tensors  # tied: llama.cpp reads the output from token_embd
    assert torch.equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"])
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(tensors["blk.1.attn_q.weight"], interleave_halves(q, config.n_head))
    assert not torch.equal(tensors["blk.1.attn_q.weight"], q)
    assert torch.equal(tensors["blk.0.ffn_down.weight"], state["model.layers.0.mlp.down_proj.weight"])


def test_gguf_export_of_a_gpt2_run_is_llama_cpp_gpt2_and_verifies(small_dataset, tmp_path):
    import gguf

    run = tmp_path / "gpt2"
    train(small_config(small_dataset, run, max_steps=1, eval_every=1, save_every=1), log=quiet)
    r = cli("export", "--checkpoint", str(run), "--output-dir", str(tmp_path / "g"), "--format", "gguf")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"  # its SentencePiece tokenizer
    r = cli("verify", str(tmp_path / "g"))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_inspect_verify_and_compare_know_the_gguf_export(llama_run, tmp_path):
    from openllm.interop.inspect import verify_path

    g = tmp_path / "g"
    export_checkpoint(llama_run, g, format="gguf")
    r = cli("verify", str(g))
    assert r.returncode == 0 and r.stdout.startswith(f"ok   {g / 'model.gguf'}"), r.stdout + r.stderr
    r = cli("compare", str(g), str(llama_run))
    assert r.returncode == 0 and "GGUF llama model (f16 weights) (openllm export)" in r.stdout, r.stdout + r.stderr
    info, run = describe(g / "model.gguf"), describe(llama_run)
    assert info["parameters"] == run["parameters"] and info["config"]["block_count"] == run["config"]["n_layer"]
    assert info["config"]["vocab_size"] == run["config"]["vocab_size"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((g / "model.gguf").read_bytes()[:-4096])
    [v] = verify_path(cut)
    assert not v.ok and "truncated or not a GGUF file" in v.problems[0] and "checkpoint" not in v.problems[0]
    with pytest.raises(OpenLLMError, match="truncated or not a GGUF file"):
        describe(cut)


@pytest.mark.llamacpp
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_equal_openllm_generate(llama_run, tmp_path, dtype):
    """Opt-in (`pytest -m llamacpp`): needs llama-cpp-python, which builds llama.cpp from source."""
    from llama_cpp import Llama

    export_checkpoint(llama_run, tmp_path / "g", format="gguf", gguf_dtype=dtype)
    ours = load_model(llama_run)
    context = ours.model.config.block_size
    llm = Llama(model_path=str(tmp_path / "g" / "model.gguf"), n_ctx=context, logits_all=True, verbose=False)
    for prompt in ["ROMEO:", "The king", "First Citizen:\nBefore we proceed", "What is", "O, "]:
        ids, _ = prompt_ids(ours.tokenizer, prompt, context)
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        expected = list(
            generate_ids(
                ours.model, ids, SamplingOptions(max_new_tokens=20, temperature=0), eos_id=ours.tokenizer.eos_id
            )
        )
        llm.reset()
        llm.eval(ids)
        got: list[int] = []
        while len(got) < 20:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == ours.tokenizer.eos_id:
                break
            got.append(token)
            llm.eval([token])
        assert got == expected, prompt
