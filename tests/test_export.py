import json
import os
import subprocess
import sys

import pytest
import torch

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import load_tokenizer
from openllm.inference.loading import load_model
from openllm.interop.convert import convert
from openllm.interop.export import export_checkpoint
from openllm.model.config import ModelConfig
from openllm.model.gpt import GPT
from openllm.training.config import TrainConfig
from openllm.training.loop import train
from tests.conftest import cli, quiet

transformers = pytest.importorskip("transformers")  # a test dependency: scripts/test.sh installs it

SAMPLE = (
    "ROMEO: But, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun. 1597 — café 🙂"
)


def test_export_loads_in_stock_transformers_with_same_logits_and_ids(trained_run, tmp_path):
    out = tmp_path / "hf"
    r = cli("export", "--checkpoint", str(trained_run / "best_model.pt"), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    ours = load_model(trained_run / "best_model.pt")
    torch.manual_seed(0)
    x = torch.randint(0, ours.model.config.vocab_size, (3, 40))
    with torch.no_grad():
        diff = (ours.model(x)[0] - model(x).logits).abs().max().item()
    assert diff < 1e-4
    assert hf_tok.encode(SAMPLE, add_special_tokens=False) == ours.tokenizer.encode(SAMPLE)
    assert hf_tok.encode(SAMPLE)[0] == 2  # BOS, as training encoded documents
    assert hf_tok.decode(hf_tok.encode(SAMPLE), skip_special_tokens=True) == SAMPLE
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (3, 2, 0)
    assert "transformers_version" not in gen  # no claim about a library that did not write it
    assert "validation loss" in (out / "README.md").read_text()
    # every file of the export has the mode a new file gets (safetensors alone made its file 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] == modes["config.json"], modes


def test_hf_tokenizer_matches_on_real_corpus(trained_run, shakespeare_path):
    from tokenizers import Tokenizer as HFTokenizer

    from openllm.data.corpus import split_documents
    from openllm.interop.tokenizer_json import hf_tokenizer_json

    tok = load_tokenizer(trained_run / "tokenizer.model")
    hf = HFTokenizer.from_str(hf_tokenizer_json(tok))
    docs = split_documents(shakespeare_path.read_text())[:2000]
    assert [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)] == tok.encode_batch(docs)


def test_export_convert_export_round_trip(trained_run, tmp_path):
    export_checkpoint(trained_run, tmp_path / "e1")
    report = convert(tmp_path / "e1", tmp_path / "run2")
    assert report.kind == "openllm-export" and report.step == 6
    export_checkpoint(tmp_path / "run2", tmp_path / "e2")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "e1" / "model.safetensors")), load_file(str(tmp_path / "e2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_hf_gpt2_dir(path, vocab, safetensors=True):
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=3
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    if not safetensors:  # the older pytorch_model.bin form
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        (path / "model.safetensors").unlink()
        torch.save(state, path / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("safetensors", [True, False])
def test_hf_gpt2_converts_matches_and_resumes(small_dataset, tmp_path, safetensors):
    vocab = small_dataset.meta["vocab_size"]
    hf_model = make_hf_gpt2_dir(tmp_path / "gpt2", vocab, safetensors)
    report = convert(tmp_path / "gpt2", tmp_path / "run", training_steps=100, tokenizer=str(small_dataset.path))
    assert report.kind == "hf-gpt2"
    ours = load_model(tmp_path / "run")
    assert ours.model.config.activation == "gelu_tanh"
    x = torch.randint(0, vocab, (2, 30))
    with torch.no_grad():
        assert (ours.model(x)[0] - hf_model(x).logits).abs().max().item() < 1e-4
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert best["optimizer_state_dict"] == {} and "fresh" in best["provenance"]["optimizer_state"]
    assert best["training_log"] == [] and "no training history" in best["provenance"]["history"]
    assert best["best_validation_loss"] is None
    result = train(
        TrainConfig(
            data=str(small_dataset.path),
            output_dir=str(tmp_path / "more"),
            batch_size=2,
            seq_len=32,
            max_steps=104,
            eval_every=2,
            save_every=2,
            eval_batches=2,
            warmup_steps=10,
            resume=str(tmp_path / "run" / "best_model.pt"),
        ),
        log=quiet,
    )
    final = torch.load(result.final_checkpoint, weights_only=True)
    assert final["step"] == 104 and [r["step"] for r in final["training_log"]] == [101, 102, 103, 104]
    lrs = [r["learning_rate"] for r in final["training_log"]]
    assert max(lrs) < final["training_config"]["learning_rate"]  # continued the decay, no jump to the peak


def make_legacy_dir(path, tokenizer_path, with_log=False):
    """A legacy OpenLLM export, built from the facts in shared/reference/legacy-openllm-format.md."""
    tok = load_tokenizer(tokenizer_path)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64, dropout=0.1)
    torch.manual_seed(1)
    model = GPT(config)
    state = dict(model.state_dict())
    for i in range(config.n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    path.mkdir(parents=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["GPTModel"],
                "model_type": "gpt",
                "vocab_size": tok.vocab_size,
                "n_layer": 2,
                "n_head": 4,
                "n_embd": 32,
                "block_size": 64,
                "dropout": 0.1,
                "bias": True,
                "torch_dtype": "float32",
                "transformers_version": "4.0.0",
                "openllm_version": "0.1.0",
                "training_steps": 10000,
                "model_size": "small",
            }
        )
    )
    (path / "tokenizer.model").write_bytes(tok.model_bytes)
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "SentencePieceTokenizer", "model_max_length": 64, "vocab_size": tok.vocab_size})
    )
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "max_length": 512,
                "max_new_tokens": 256,
                "temperature": 0.7,
                "top_k": 40,
                "top_p": 0.9,
                "do_sample": True,
                "pad_token_id": 0,
                "eos_token_id": 1,
                "bos_token_id": 2,
            }
        )
    )
    if with_log:
        (path / "training_log.json").write_text(json.dumps([{"step": 9999, "loss": 5.3}, {"step": 10000, "loss": 5.2}]))
    return model


def test_legacy_export_converts_and_resumes_via_the_legacy_command(small_dataset, small_corpus, tmp_path):
    src = tmp_path / "exports" / "huggingface-10k" / "huggingface"
    model = make_legacy_dir(src, small_dataset.path)
    script = os.path.join(os.path.dirname(__file__), "..", "core", "src", "convert_10k_model.py")
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(small_corpus.read_text().split("\n\n")[:20]))
    r = subprocess.run(
        [
            sys.executable,
            script,
            "--input-dir",
            str(src),
            "--output-dir",
            str(tmp_path / "models" / "improved-10k"),
            "--training-steps",
            "10000",
            "--eval-data",
            str(val),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "legacy" in r.stdout and "eos_token_id 1 -> 3" in r.stdout and "MB" in r.stdout
    run = tmp_path / "models" / "improved-10k"
    best = torch.load(run / "best_model.pt", weights_only=True)
    assert not any(k.endswith(".attn.bias") for k in best["model_state_dict"])
    assert best["step"] == 10000
    assert json.loads((run / "generation_config.json").read_text())["eos_token_id"] == 3
    # the loss is measured, not invented: recompute it
    from openllm.model.scoring import evaluate_file

    expected = evaluate_file(load_model(run).model, load_tokenizer(run), val, seq_len=64, stride=64).loss
    assert best["best_validation_loss"] == pytest.approx(expected, rel=1e-9)
    assert best["validation_log"] == [
        {
            "step": 10000,
            "validation_loss": best["best_validation_loss"],
            "validation_perplexity": pytest.approx(torch.tensor(expected).exp().item()),
        }
    ]
    ours = load_model(run).model
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], model.eval()(x)[0], atol=1e-5)
    result = train(
        TrainConfig(
            data=str(small_dataset.path),
            output_dir=str(tmp_path / "cont"),
            batch_size=2,
            seq_len=32,
            max_steps=10002,
            eval_every=1,
            save_every=1,
            eval_batches=2,
            resume=str(run),
        ),
        log=quiet,
    )
    assert result.step == 10002


def test_legacy_history_beside_weights_is_imported(small_dataset, tmp_path):
    make_legacy_dir(tmp_path / "legacy", small_dataset.path, with_log=True)
    convert(tmp_path / "legacy", tmp_path / "run")
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert [r["step"] for r in best["training_log"]] == [9999, 10000]
    assert "imported" in best["provenance"]["history"]


def test_nanogpt_checkpoint_with_compile_prefixes(small_dataset, tmp_path):
    vocab = small_dataset.meta["vocab_size"]
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab, dropout=0.0)
    model = GPT(ModelConfig(**args))
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    (tmp_path / "out").mkdir()
    torch.save(
        {
            "model": state,
            "model_args": args,
            "iter_num": 2000,
            "best_val_loss": torch.tensor(1.5),
            "config": {"dataset": "shakespeare"},
        },
        tmp_path / "out" / "ckpt.pt",
    )
    report = convert(tmp_path / "out", tmp_path / "run", tokenizer=str(small_dataset.path))
    assert report.kind == "nanogpt" and report.step == 2000
    loaded = load_model(tmp_path / "run")
    x = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded.model(x)[0], model.eval()(x)[0])
    best = torch.load(tmp_path / "run" / "best_model.pt", weights_only=True)
    assert best["best_validation_loss"] is None and best["provenance"]["source_reported"]["best_val_loss"] == 1.5


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/openllm-pwned",))


def test_pickle_that_runs_code_is_refused_not_executed(small_dataset, tmp_path):
    src = tmp_path / "legacy"
    make_legacy_dir(src, small_dataset.path)
    if os.path.exists("/tmp/openllm-pwned"):
        os.remove("/tmp/openllm-pwned")
    torch.save({"transformer.wte.weight": torch.zeros(2), "payload": Evil()}, src / "pytorch_model.bin")
    r = cli("convert", "--input-dir", str(src), "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists("/tmp/openllm-pwned")
    assert not (tmp_path / "run").exists()


def test_inconsistent_inputs_are_refused(small_dataset, tmp_path):
    src = tmp_path / "legacy"
    make_legacy_dir(src, small_dataset.path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(OpenLLMError, match="do not match the config"):
        convert(src, tmp_path / "a")
    (src / "config.json").write_text(json.dumps(cfg))
    other = tmp_path / "tok"
    from openllm.data.tokenizer import train_tokenizer

    train_tokenizer(["some text here for a tokenizer"] * 5 + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ"], 300).save(other)
    with pytest.raises(OpenLLMError, match="tokenizer has 300 tokens"):
        convert(src, tmp_path / "b", tokenizer=str(other / "tokenizer.model"))
    (src / "config.json").unlink()
    r = cli("convert", "--input-dir", str(src), "--output-dir", str(tmp_path / "c"))
    assert r.returncode == 2 and "no config.json" in r.stderr


def test_verify_catches_truncated_and_bit_flipped(trained_run, tmp_path):
    good = tmp_path / "good.pt"
    good.write_bytes((trained_run / "best_model.pt").read_bytes())
    assert cli("verify", str(good)).returncode == 0
    data = bytearray(good.read_bytes())
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    r = cli("verify", str(tmp_path / "trunc.pt"))
    assert r.returncode == 1 and "truncated" in r.stdout
    # flip one bit inside the stored weights (far from the zip headers)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    r = cli("verify", str(tmp_path / "flip.pt"))
    assert r.returncode == 1 and ("checksum mismatch" in r.stdout or "corrupt" in r.stdout), r.stdout


def test_inspect_and_compare(trained_run, tmp_path, small_dataset):
    r = cli("inspect", str(trained_run))
    assert r.returncode == 0 and "openllm checkpoint v2" in r.stdout and "best checkpoint:   step" in r.stdout
    make_legacy_dir(tmp_path / "legacy", small_dataset.path)
    r = cli("compare", str(tmp_path / "legacy"), str(trained_run / "final_model.pt"), "--json")
    assert r.returncode == 0, r.stderr
    raw, full = json.loads(r.stdout)
    assert raw["format"].startswith("raw state dict") and raw["mask_buffers"] == 2 and not raw["optimizer_state"]
    assert full["optimizer_state"] and full["training_log_entries"] == 6
    r = cli("compare", str(tmp_path / "legacy"), str(trained_run / "final_model.pt"))
    assert "optimizer state" in r.stdout and "validation log entries" in r.stdout


def test_exported_generation_defaults_never_run_past_the_context(trained_run, tmp_path):
    import transformers

    out = tmp_path / "hf"
    assert cli("export", "--checkpoint", str(trained_run), "--output-dir", str(out)).returncode == 0
    gen = json.loads((out / "generation_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert gen.get("max_new_tokens") is None and gen["max_length"] <= config["n_positions"]
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    transformers.set_seed(0)
    for i in range(20):  # sampled with the exported defaults: must stop at the context, never crash
        text = pipe("ROMEO:" * (1 + i % 3))[0]["generated_text"]
        assert text.startswith("ROMEO:")
