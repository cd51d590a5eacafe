"""Errors in our words (issue 22, class 6): an imported config's numbers checked by name, a tokenizer that
panics, a log of the wrong shape, a prompt that is not UTF-8 and a resume with the other optimizer each give
one error line that says what is wrong, never a Python or Rust exception's own text. (A full disk, the
first case of the class, is tested with the other full-disk promise in test_promises.py.)"""

import json

import httpx
import pytest
import torch

from openllm.cli import main
from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import load_tokenizer
from openllm.inference.loading import load_model
from openllm.inference.server import ServerLimits, create_app
from openllm.interop import gpt2, llama
from openllm.model.config import ModelConfig
from openllm.model.gpt import GPT
from openllm.training.loop import train
from tests.conftest import cli, live_server, quiet, small_config

BACKTRACKING = "a" * 40 + "b"  # `(a+)+$` tries every split of the a's before giving up at the b


@pytest.fixture(scope="module")
def hostile_export(tmp_path_factory):
    """A Hugging Face directory: a tiny GPT-2 whose tokenizer.json normalizes with `(a+)+$`."""
    from safetensors.torch import save_file
    from tokenizers import Regex, Tokenizer, models, normalizers

    d = tmp_path_factory.mktemp("hostile")
    raw = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "x": 2}, merges=[]))
    raw.normalizer = normalizers.Replace(Regex("(a+)+$"), "x")
    raw.save(str(d / "tokenizer.json"))
    tok = load_tokenizer(d / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8, block_size=64, dropout=0.0)
    save_file(gpt2.to_hf(GPT(config).state_dict(), config), str(d / gpt2.EXPORT_WEIGHTS))
    (d / "config.json").write_text(json.dumps(gpt2.config_to_hf(config, tok.special)))
    return d


# --------------------------------------------------------------------- (b) imported configs, checked by name

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
}
GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32}


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("llama", "num_attention_heads", 0),  # was a ZeroDivisionError
        ("llama", "num_hidden_layers", 2.5),  # was accepted as 2
        ("llama", "hidden_size", "16"),
        ("llama", "num_key_value_heads", -1),
        ("llama", "rms_norm_eps", -1e-6),
        ("llama", "rope_theta", float("inf")),
        ("llama", "tie_word_embeddings", "false"),  # bool("false") is True
        ("llama", "attention_dropout", 1.5),
        ("llama", "head_dim", 0),
        ("gpt2", "n_head", 0),
        ("gpt2", "n_layer", 2.5),
        ("gpt2", "n_positions", True),
        ("gpt2", "layer_norm_epsilon", "1e-5"),
        ("gpt2", "resid_pdrop", -0.1),
    ],
)
def test_every_numeric_field_of_an_imported_config_is_checked_by_name(family, field, value):
    cfg = {**(LLAMA if family == "llama" else GPT2), field: value}
    adapter = llama if family == "llama" else gpt2
    with pytest.raises(OpenLLMError, match=rf"src: config.json: {field} must be") as exc:
        adapter.config_from_hf(cfg, "src")
    assert repr(value) in str(exc.value)
    assert adapter.config_from_hf(LLAMA if family == "llama" else GPT2, "src").n_layer == 2  # the base is fine


def test_convert_of_a_config_with_zero_heads_is_one_line(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA, "num_attention_heads": 0}))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 16)}, str(d / "model.safetensors"))
    r = cli("convert", "--input-dir", str(d), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "num_attention_heads must be a whole number of at least 1, got 0" in r.stderr, r.stderr


# --------------------------------------------------------------------- (c) a tokenizer that panics


def test_a_panicking_tokenizer_is_one_error_naming_it(hostile_export):
    tok = load_tokenizer(hostile_export / "tokenizer.json")
    with pytest.raises(OpenLLMError, match=r"the tokenizer .*tokenizer.json failed to encode this text \(Onig"):
        tok.encode(BACKTRACKING)
    with pytest.raises(OpenLLMError, match="failed to encode"):
        tok.encode_batch(["a", BACKTRACKING])
    assert tok.encode("ab") == [0, 1]  # the same tokenizer on other text still works

    r = cli("generate", "--model", str(hostile_export), "--prompt", BACKTRACKING, "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # (the Rust library prints its own panic note before it)
    assert last.startswith("openllm generate: error: the tokenizer") and "tokenizer.json" in last, r.stderr


def test_a_panicking_tokenizer_is_a_400_from_the_server(hostile_export):
    loaded = load_model(hostile_export)
    with live_server(create_app(loaded, "hostile", ServerLimits(max_tokens=4))) as url:
        for path, body in [
            ("/v1/completions", {"prompt": BACKTRACKING, "max_tokens": 2}),
            ("/tokenize", {"prompt": BACKTRACKING}),
        ]:
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
            assert "failed to encode" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=30).is_success


# --------------------------------------------------------------------- (d) logs of the wrong shape


@pytest.mark.parametrize(
    "log, problem",
    [
        ([{"step": 3}], "record 1 lacks 'validation_loss'"),  # was a KeyError
        ([{"step": 3, "validation_loss": "low"}], "record 1 has a str for 'validation_loss'"),
        ([[3, 1.0]], "record 1 is a list, not an object"),
        ({"step": 3}, "must hold a list of records, not a dict"),
    ],
)
def test_plot_names_a_log_of_the_wrong_shape(tmp_path, log, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_log.json").write_text(json.dumps([{"step": 1, "loss": 5.0, "learning_rate": 1e-3}]))
    (run / "validation_log.json").write_text(json.dumps(log))
    r = cli("plot", str(run))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "validation_log.json" in r.stderr and problem in r.stderr, r.stderr


# --------------------------------------------------------------------- (e) command-line text that is not UTF-8


def test_a_prompt_that_is_not_utf8_is_refused_by_name(hostile_export, capsys):
    # a byte 0xFF on the command line reaches Python as the lone surrogate U+DCFF (surrogateescape)
    r = cli("generate", "--model", str(hostile_export), "--prompt", "ab\udcff")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the value of --prompt is not valid UTF-8 (byte 0xFF at character 3)" in r.stderr, r.stderr
    assert main(["generate", "--model", str(hostile_export), "--prompt=\udcc3x"]) == 2
    assert "--prompt is not valid UTF-8 (byte 0xC3 at character 1)" in capsys.readouterr().err


# --------------------------------------------------------------------- (f) resuming with the other optimizer


@pytest.mark.parametrize("trained, other", [("muon", "adamw"), ("adamw", "muon")])
def test_resuming_with_the_other_optimizer_says_which_to_use(small_dataset, tmp_path, trained, other):
    run = dict(arch="llama", max_steps=3, eval_every=3, save_every=3)
    train(small_config(small_dataset, tmp_path / "r", optimizer=trained, **run), log=quiet)
    with pytest.raises(OpenLLMError) as exc:
        train(
            small_config(small_dataset, tmp_path / "r", optimizer=other, resume="auto", **{**run, "max_steps": 6}),
            log=quiet,
        )
    assert str(exc.value) == (
        f"the checkpoint was trained with --optimizer {trained}; resume with --optimizer {trained} (or start a new run)"
    )
