"""GPT-2 style byte-level BPE models travel with their tokenizer: a `transformers` GPT-2 saved with
`save_pretrained` (tokenizer.json, or only the vocab.json + merges.txt pair) and an OpenLLM run
prepared with `--tokenizer-type tiktoken-bpe`, through convert, generate, resume and export."""

from __future__ import annotations

import json

import pytest
import torch

from openllm.data.corpus import read_text, split_documents
from openllm.data.tokenizer import load_tokenizer
from tests.conftest import SMALL_RUN, cli, load, quiet, small_config

transformers = pytest.importorskip("transformers")

# Prompts whose continuation starts with a space or joins a word: decoding the continuation on its own
# would lose the space at the boundary.
PROMPTS = ["ROMEO:", "The king", "What say you to", "First Citizen:\nWe are accounted poor", "O, "]
CONTEXT = 64


@pytest.fixture(scope="module")
def documents(small_corpus) -> list[str]:
    return split_documents(read_text(small_corpus)[0])


@pytest.fixture(scope="module")
def hf_gpt2(documents, tmp_path_factory):
    """A GPT2LMHeadModel trained briefly on Shakespeare with a byte-level BPE from `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    raw.train_from_iterator(
        documents,
        trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = transformers.GPT2TokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=500, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.tensor([i for d in documents for i in [*tok.encode(d), 0]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # a few steps so greedy choices are clear-cut, not near-ties of a random model
        starts = torch.randint(len(ids) - CONTEXT, (8,))
        x = torch.stack([ids[s : s + CONTEXT] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("hf") / "gpt2-bpe"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_agrees_with_transformers(checkpoint, export_dir, documents, run_cli: bool = True) -> None:
    """AutoTokenizer gives our ids on 200 documents; greedy pipeline text equals ours on PROMPTS."""
    from openllm.inference.generate import SamplingOptions, generate_text
    from openllm.inference.loading import load_model

    ours = load_model(checkpoint)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    docs = (documents * 2)[:200]
    assert [hf_tok(d)["input_ids"] for d in docs] == [ours.tokenizer.prompt_ids(d) for d in docs]
    assert all(hf_tok.decode(hf_tok(d)["input_ids"], skip_special_tokens=True) == d for d in docs)
    pipe = transformers.pipeline("text-generation", model=str(export_dir), tokenizer=str(export_dir), device="cpu")
    for prompt in PROMPTS:
        n = CONTEXT - len(ours.tokenizer.prompt_ids(prompt))
        theirs = pipe(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"]
        mine = generate_text(ours.model, ours.tokenizer, prompt, SamplingOptions(max_new_tokens=n, temperature=0))
        assert theirs == prompt + mine, prompt
    if run_cli:  # and the command line prints the same text
        prompt = PROMPTS[1]
        n = CONTEXT - len(ours.tokenizer.prompt_ids(prompt))
        r = cli(
            "generate", "--model", str(checkpoint), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == pipe(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"] + "\n"
    transformers.set_seed(0)
    for i in range(20):  # sampled with the exported defaults: stops at the context, never crashes
        assert pipe(PROMPTS[i % len(PROMPTS)])[0]["generated_text"].startswith(PROMPTS[i % len(PROMPTS)])


def test_transformers_gpt2_with_bpe_converts_generates_resumes_exports(hf_gpt2, documents, small_corpus, tmp_path):
    from openllm.interop.convert import convert
    from openllm.interop.export import export_checkpoint
    from openllm.training.loop import train

    run = tmp_path / "run"
    convert(hf_gpt2, run, training_steps=60)
    ckpt = load(run / "best_model.pt")
    assert ckpt["tokenizer_sha256"] and (run / "tokenizer.json").is_file() and not (run / "tokenizer.model").exists()
    gen = json.loads((run / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (0, 0, None)  # <|endoftext|> is 0

    # resume on new text: encoded with the run's BPE (not a newly trained tokenizer), same hash
    more = tmp_path / "more.txt"
    more.write_text("\n\n".join(reversed(documents)), encoding="utf-8")
    from openllm.training.config import TrainConfig

    options = {**SMALL_RUN, "max_steps": 63}
    train(
        TrainConfig(output_dir=str(run), data_file=str(more), resume=str(run / "best_model.pt"), **options), log=quiet
    )
    resumed = load(run / "final_model.pt")
    assert resumed["step"] == 63 and resumed["tokenizer_sha256"] == ckpt["tokenizer_sha256"]
    assert json.loads((run / "dataset" / "meta.json").read_text())["tokenizer_sha256"] == ckpt["tokenizer_sha256"]

    export_checkpoint(run / "final_model.pt", tmp_path / "hf")
    assert_agrees_with_transformers(run / "final_model.pt", tmp_path / "hf", documents)


def test_a_gpt2_vocab_and_merges_pair_converts_to_the_same_tokenizer(hf_gpt2, tmp_path):
    from openllm.data.tokenizer import load_tokenizer
    from openllm.interop.convert import convert

    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if (hf_gpt2 / name).is_file():
            (pair / name).write_bytes((hf_gpt2 / name).read_bytes())
    if not (pair / "vocab.json").is_file():  # a fast tokenizer saved without the pair: write it as GPT-2 ships it
        load_tokenizer(hf_gpt2).raw.model.save(str(pair))  # type: ignore[attr-defined]
    convert(pair, tmp_path / "run")
    full, from_pair = load_tokenizer(hf_gpt2), load_tokenizer(tmp_path / "run")
    text = "ROMEO: But, soft! what light through yonder window breaks? 1597 — café"
    assert from_pair.encode(text) == full.encode(text) and from_pair.decode(full.encode(text)) == text
    assert (from_pair.eos_id, from_pair.bos_id) == (0, 0)


def test_openllm_tiktoken_bpe_run_exports_with_its_tokenizer(small_corpus, documents, tmp_path):
    """A run prepared with `--tokenizer-type tiktoken-bpe` (rustbpe + tiktoken; an HFTokenizer underneath, so it
    also stands for `bytelevel-bpe` runs here) exports a tokenizer.json that AutoTokenizer reads with our ids."""
    from openllm.data.dataset import load_dataset
    from openllm.interop.export import export_checkpoint
    from openllm.training.loop import train

    r = cli(
        "prepare",
        "--input",
        str(small_corpus),
        "--output-dir",
        str(tmp_path / "ds"),
        "--vocab-size",
        "500",
        "--tokenizer-type",
        "tiktoken-bpe",
    )
    assert r.returncode == 0, r.stderr
    ds = load_dataset(tmp_path / "ds")
    assert ds.meta["tokenizer"] == "byte-level BPE (tiktoken), 500 tokens" and (ds.path / "tokenizer.json").is_file()
    run = tmp_path / "run"
    train(small_config(ds, run, max_steps=SMALL_RUN["max_steps"]), log=quiet)
    export_checkpoint(run / "best_model.pt", tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    assert load_tokenizer(tmp_path / "hf").kind == "tiktoken-bpe"  # and OpenLLM reads the export as what it was
    assert_agrees_with_transformers(run / "best_model.pt", tmp_path / "hf", documents, run_cli=False)
