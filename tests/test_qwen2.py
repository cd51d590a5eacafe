"""arch qwen2 (the architecture registry's proof): a random Qwen2ForCausalLM built by transformers converts with
the same logits, exports back to Qwen2ForCausalLM with the same logits, writes a GGUF file that the gguf reader
reads back tensor for tensor; GGUF for GPT-2 and byte-level BPE; the registry names every architecture once."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from openllm.core.errors import OpenLLMError
from openllm.inference.loading import load_model
from openllm.interop import families
from openllm.interop.convert import convert
from openllm.interop.export import export_checkpoint
from openllm.interop.inspect import describe, verify_path
from openllm.model import registry
from openllm.model.config import ModelConfig, model_config_for
from openllm.training.loop import train
from tests.conftest import cli, quiet, small_config

transformers = pytest.importorskip("transformers")  # a test dependency: scripts/test.sh installs it
gguf = pytest.importorskip("gguf")
SRC = Path(__file__).resolve().parents[1] / "src" / "openllm"


@pytest.fixture(scope="module")
def qwen2_pair(small_dataset, tmp_path_factory):
    """A transformers Qwen2ForCausalLM (random weights, biases made non-zero, grouped-query attention, untied head)
    saved to a directory, and our conversion of it."""
    tmp = tmp_path_factory.mktemp("qwen2")
    vocab = small_dataset.tokenizer.vocab_size
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=50000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # transformers initialises biases to zero: make them matter
    hf.save_pretrained(tmp / "src")
    report = convert(tmp / "src", tmp / "run", tokenizer=str(small_dataset.path / "tokenizer.model"))
    return hf, tmp / "run", report


def test_a_transformers_qwen2_converts_with_the_same_logits_and_exports_back(qwen2_pair, tmp_path):
    hf, run, report = qwen2_pair
    assert report.kind == "hf-qwen2"
    ours = load_model(run)
    config = ours.model.config
    assert (config.arch, config.bias, config.kv_heads, config.tie_embeddings) == ("qwen2", True, 2, False)
    assert (config.rope_theta, config.mlp_hidden) == (50000.0, 96)
    assert "model.layers.1.self_attn.k_proj.bias" in ours.model.state_dict()
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        assert (ours.model(x)[0] - want).abs().max().item() < 1e-4
    export_checkpoint(run, tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (again(x).logits - want).abs().max().item() < 1e-4
    info = describe(tmp_path / "again")
    assert info["format"] == "Hugging Face Qwen2 directory (openllm export)"
    assert info["config"]["num_key_value_heads"] == 2


def test_qwen2_gguf_holds_every_tensor_with_its_biases_and_reads_back(qwen2_pair, tmp_path):
    _, run, _ = qwen2_pair
    r = cli("export", "--checkpoint", str(run), "--output-dir", str(tmp_path / "g"), "--format", "gguf",
            "--gguf-dtype", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.attention.head_count_kv"].contents() == 2
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    state = load_model(run).model.state_dict()
    # qwen2 rotates halves as we do: the query rows and their biases are written as they are
    assert torch.equal(tensors["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(tensors["blk.1.attn_k.bias"], state["model.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(tensors["output.weight"], state["lm_head.weight"])  # untied: its own tensor
    assert len(tensors) == len(state)
    [v] = verify_path(tmp_path / "g")
    assert v.ok, v.problems
    assert describe(tmp_path / "g")["parameters"] == sum(t.numel() for t in state.values())


def test_qwen2_trains_and_resumes_exactly(small_dataset, tmp_path):
    common = dict(arch="qwen2", optimizer="muon", lr_schedule="wsd", lr_decay_steps=8, dropout=0.0)
    straight = train(small_config(small_dataset, tmp_path / "a", max_steps=8, **common), log=quiet)
    train(small_config(small_dataset, tmp_path / "b", max_steps=4, **common), log=quiet)
    resumed = train(small_config(small_dataset, tmp_path / "b", max_steps=8, resume="auto", **common), log=quiet)
    a = torch.load(straight.final_checkpoint, weights_only=True)
    b = torch.load(resumed.final_checkpoint, weights_only=True)
    assert a["config"]["arch"] == "qwen2" and a["model_info"]["architecture"].startswith("Qwen2")
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert any(k.endswith("q_proj.bias") for k in a["model_state_dict"])


def test_gpt2_and_bytelevel_bpe_export_to_gguf_in_llama_cpp_layout(tmp_path):
    """A GPT-2 model with a byte-level BPE (as a converted GPT-2 or nanoGPT run has): llama.cpp's gpt2 layout,
    its gpt2 tokenizer with merges and the gpt-2 pre-tokenizer; a bias-free model gets zero biases."""
    from openllm.interop.gguf_file import write_gguf
    from openllm.model import build_model

    corpus = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    from openllm.data.tokenizer.hf import train_bytelevel_bpe

    tok = train_bytelevel_bpe(corpus, 300)
    for bias in (True, False):
        config = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0, bias=bias)
        state = build_model(config).state_dict()
        path = tmp_path / f"gpt2-{bias}.gguf"
        write_gguf(path, state, config, tok, "f32", name="t")
        reader = gguf.GGUFReader(path)
        fields = {k: reader.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model")}
        assert fields == {"general.architecture": "gpt2", "tokenizer.ggml.model": "gpt2"}
        assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
        assert reader.fields["tokenizer.ggml.tokens"].contents() == [tok.id_to_piece(i) for i in range(300)]
        assert len(reader.fields["tokenizer.ggml.merges"].contents()) == 300 - 257
        tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
        assert torch.equal(tensors["blk.0.attn_qkv.weight"], state["transformer.h.0.attn.c_attn.weight"])
        assert torch.equal(tensors["position_embd.weight"], state["transformer.wpe.weight"])
        assert torch.equal(tensors["output.weight"], state["transformer.wte.weight"])
        want_bias = state.get("transformer.h.1.mlp.c_fc.bias", torch.zeros(4 * 32))
        assert torch.equal(tensors["blk.1.ffn_up.bias"], want_bias)
        assert not families.family("gpt2").gguf.expected("gpt2", 2).__contains__("blk.2.attn_qkv.weight")
        assert set(families.family("gpt2").gguf.expected("gpt2", 2)) == set(tensors)


def test_a_tokenizer_llama_cpp_cannot_hold_is_refused_by_name_and_nothing_written(tmp_path):
    from openllm.data.tokenizer.hf import character_tokenizer
    from openllm.interop.gguf_file import write_gguf
    from openllm.model import build_model

    tok = character_tokenizer({c: i for i, c in enumerate("abcdefgh")})
    config = ModelConfig(vocab_size=8, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.0)
    with pytest.raises(OpenLLMError, match="GGUF export needs a SentencePiece tokenizer or a byte-level BPE"):
        write_gguf(tmp_path / "x.gguf", build_model(config).state_dict(), config, tok, "f32", name="t")
    assert not (tmp_path / "x.gguf").exists()


def test_the_registry_names_every_architecture_and_nothing_else_tests_an_arch_name():
    assert registry.names() == ("gpt2", "llama", "qwen2")
    for name in registry.names():
        arch = registry.architecture(name)
        assert families.family(name).arch == name and arch.model.BLOCKS and arch.model.EMBEDDING
        assert model_config_for("tiny", arch=name).architecture is arch
    with pytest.raises(OpenLLMError, match="arch must be one of gpt2, llama, qwen2"):
        ModelConfig(arch="mamba")
    # no module outside the architecture files compares a config's arch with a name
    arch_files = {"model/gpt.py", "model/llama.py", "model/qwen2.py", "interop/gpt2.py", "interop/llama.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel in arch_files | {"interop/qwen2.py"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)]
                attrs = [n for n in (node.left, *node.comparators) if isinstance(n, ast.Attribute) and n.attr == "arch"]
                if attrs and any(n.value in registry.names() for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"arch compared with a name outside the architecture files: {offenders}"


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([out[-model.config.block_size :]]))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["qwen2", "gpt2-bytelevel-bpe", "llama-tiktoken-bpe"])
def test_llama_cpp_tokens_and_greedy_ids_equal_ours(kind, qwen2_pair, small_corpus, tmp_path):
    """Opt-in (`pytest -m llamacpp`): needs llama-cpp-python, which builds llama.cpp from source. A converted
    Qwen2 model (SentencePiece tokenizer), a GPT-2 run with a byte-level BPE and a Llama run with a tiktoken-bpe
    tokenizer, through llama.cpp."""
    from llama_cpp import Llama

    from openllm.data.prepare import prepare_dataset

    if kind == "qwen2":
        run = qwen2_pair[1]
    else:  # a byte-level BPE: GPT-2's pre-tokenizer (llama.cpp's gpt-2), or Llama 3's (tiktoken-bpe: llama-bpe)
        arch, tokenizer_type = kind.split("-", 1)
        data = prepare_dataset([small_corpus], tmp_path / "bpe", vocab_size=400, tokenizer_type=tokenizer_type)
        run = tmp_path / "run"
        train(small_config(data, run, arch=arch, max_steps=30, eval_every=30, save_every=30), log=quiet)
    export_checkpoint(run, tmp_path / "g", format="gguf", gguf_dtype="f32")
    ours = load_model(run)
    llm = Llama(model_path=str(tmp_path / "g" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    texts = small_corpus.read_text().split("\n\n")[:200] + ["it's I'LL 12345 3.14\t\ttabs\n\n\n  x", "héllo 😀 wörld  "]
    add_bos = ours.tokenizer.special.add_bos
    for text in texts:  # the text split and merges as ours, on real text and odd spacing
        assert llm.tokenize(text.encode(), add_bos=add_bos, special=False) == ours.tokenizer.prompt_ids(text), text
    for prompt in ["ROMEO:", "The king", "First Citizen:\nBefore we proceed"]:
        ids = ours.tokenizer.prompt_ids(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=ours.tokenizer.special.add_bos, special=False) == ids
        llm.reset()
        llm.eval(ids)
        got: list[int] = []
        while len(got) < 12:
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        assert got == _greedy(ours.model, ids, 12), prompt
