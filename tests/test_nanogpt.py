"""nanoGPT checkpoints as nanoGPT writes them (``out-*/ckpt.pt`` and ``data/<dataset>/meta.pkl``):
convert, generate, resume with the imported AdamW state, export to ``transformers``."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from openllm.core.errors import OpenLLMError
from tests.conftest import cli, load

BLOCK, LAYERS, HEADS, WIDTH = 32, 2, 2, 48


def reference_logits(sd: dict, idx: list[int]) -> torch.Tensor:
    """Last-position logits of nanoGPT's model for ``idx``, computed straight from its state dict
    (GPT-2 blocks: pre-LayerNorm, causal attention, exact-GELU MLP, tied head)."""
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][: len(idx)]
    T, C = x.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(h, sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (t.view(T, HEADS, C // HEADS).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // HEADS)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(T, C)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"])
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    return x[-1] @ sd["transformer.wte.weight"].T


def nanogpt_sample(sd: dict, itos: dict, stoi: dict, prompt: str, n: int) -> str:
    """nanoGPT's sample.py at temperature -> 0: encode, crop to the block, argmax, decode."""
    idx = [stoi[c] for c in prompt]
    with torch.no_grad():
        for _ in range(n):
            idx.append(int(reference_logits(sd, idx[-BLOCK:]).argmax()))
    return "".join(itos[i] for i in idx)


@pytest.fixture(scope="module")
def nanogpt_checkout(tmp_path_factory, shakespeare_path):
    """A nanoGPT working tree after `prepare.py` and a short `train.py` run of shakespeare_char."""
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    root = tmp_path_factory.mktemp("nanoGPT")
    text = shakespeare_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi, itos = {c: i for i, c in enumerate(chars)}, dict(enumerate(chars))
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)

    torch.manual_seed(0)
    args = dict(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, block_size=BLOCK, bias=True, vocab_size=len(chars))
    model = GPT(ModelConfig(**args, dropout=0.0))
    names = dict(model.named_parameters())
    decay = [p for p in names.values() if p.dim() >= 2]
    other = [p for p in names.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=3e-3)
    data = torch.tensor([stoi[c] for c in text[:20000]])
    for _ in range(30):
        starts = torch.randint(len(data) - BLOCK - 1, (8,))
        x = torch.stack([data[s : s + BLOCK] for s in starts])
        y = torch.stack([data[s + 1 : s + BLOCK + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = model.state_dict()
    raw = {"_orig_mod." + k: v for k, v in sd.items()}  # saved from a torch.compile'd model
    for i in range(LAYERS):  # the causal-mask buffers nanoGPT keeps without flash attention
        raw[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(BLOCK, BLOCK).tril().view(1, 1, BLOCK, BLOCK)
    out = root / "out-shakespeare-char"
    out.mkdir()
    torch.save(
        {
            "model": raw,
            "optimizer": opt.state_dict(),
            "model_args": {**args, "dropout": 0.2},
            "iter_num": 30,
            "best_val_loss": torch.tensor(2.5),
            "config": {
                "dataset": "shakespeare_char",
                "learning_rate": 3e-3,
                "min_lr": 3e-4,
                "batch_size": 8,
                "block_size": BLOCK,
                "weight_decay": 0.1,
                "warmup_iters": 5,
                "dropout": 0.2,
            },
        },
        out / "ckpt.pt",
    )
    return root, {k: v.detach().clone() for k, v in sd.items()}, stoi, itos, opt.state_dict()


def test_char_checkpoint_round_trip(nanogpt_checkout, shakespeare_path, tmp_path):
    from openllm.interop.convert import convert
    from openllm.interop.export import export_checkpoint
    from openllm.training.config import TrainConfig
    from openllm.training.loop import train

    root, sd, stoi, itos, nano_opt = nanogpt_checkout
    run = tmp_path / "run"
    report = convert(root / "out-shakespeare-char" / "ckpt.pt", run)
    ckpt = load(run / "best_model.pt")
    # the source's own vocabulary, ids and settings; nothing relabelled from a preset
    assert report.step == 30 and ckpt["config"]["dropout"] == 0.2 and ckpt["config"]["block_size"] == BLOCK
    assert ckpt["training_config"]["dropout"] == 0.2 and ckpt["training_config"]["learning_rate"] == 3e-3
    gen = (run / "generation_config.json").read_text()
    assert '"eos_token_id": null' in gen and '"bos_token_id": null' in gen
    assert ckpt["provenance"]["optimizer_state"].startswith("imported from the nanoGPT checkpoint's AdamW state")
    wte = ckpt["optimizer_state_dict"]["state"][0]  # transformer.wte.weight is the first parameter in both layouts
    assert torch.equal(wte["exp_avg"], nano_opt["state"][0]["exp_avg"])

    # greedy generation equals nanoGPT's model + decode, also past the context (46 > 32 characters)
    prompt = "ROMEO:\nI"
    r = cli("generate", "--model", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "38")
    assert r.returncode == 0, r.stderr
    assert r.stdout == nanogpt_sample(sd, itos, stoi, prompt, 38) + "\n"

    # resume on new text: the run's character vocabulary encodes it, the AdamW moments carry on
    more = tmp_path / "more.txt"
    more.write_text(shakespeare_path.read_text(encoding="utf-8")[30000:60000], encoding="utf-8")
    logs: list[str] = []
    result = train(
        TrainConfig(
            resume=str(run / "best_model.pt"),
            output_dir=str(run),
            data_file=str(more),
            max_steps=34,
            batch_size=4,
            eval_every=2,
            eval_batches=1,
            log_every=100,
        ),
        log=logs.append,
    )
    assert result.step == 34 and not any("fresh AdamW" in m for m in logs), logs
    resumed = load(run / "final_model.pt")
    assert resumed["config"]["dropout"] == 0.2 and resumed["config"]["vocab_size"] == len(stoi)
    assert resumed["tokenizer_sha256"] == ckpt["tokenizer_sha256"] is not None

    # export: transformers with the exported tokenizer gives the same ids and the same greedy text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openllm.inference.generate import SamplingOptions, generate_text
    from openllm.inference.loading import load_model

    export_checkpoint(run / "final_model.pt", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(run / "final_model.pt")
    sample = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert hf_tok(sample)["input_ids"] == ours.tokenizer.encode(sample) == [stoi[c] for c in sample]
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    out = hf_model.generate(ids, do_sample=False, max_new_tokens=BLOCK - ids.shape[1], pad_token_id=0)
    theirs = hf_tok.decode(out[0], skip_special_tokens=True)
    mine = generate_text(
        ours.model, ours.tokenizer, prompt, SamplingOptions(max_new_tokens=BLOCK - ids.shape[1], temperature=0)
    )
    assert theirs == prompt + mine


def test_convert_summary_says_what_the_provenance_records(nanogpt_checkout, tmp_path, capsys):
    from openllm.cli import main

    root = nanogpt_checkout[0]
    with_moments = root / "out-shakespeare-char" / "ckpt.pt"
    bare = root / "out-without-optimizer"
    bare.mkdir(exist_ok=True)
    raw = load(with_moments)
    del raw["optimizer"]
    torch.save(raw, bare / "ckpt.pt")
    for source, expected in ((with_moments, "imported from the nanoGPT"), (bare / "ckpt.pt", "fresh (")):
        out = tmp_path / source.parent.name
        assert main(["convert", "--input-dir", str(source), "--output-dir", str(out)]) == 0
        printed = capsys.readouterr().out
        recorded = load(out / "best_model.pt")["provenance"]["optimizer_state"]
        assert recorded.startswith(expected) and "optimizer state" in printed and f"({recorded})" in printed, printed


def test_a_converted_then_trained_model_keeps_its_provenance_chain(nanogpt_checkout, shakespeare_path, tmp_path):
    from openllm.cli import main
    from openllm.interop.export import export_checkpoint
    from openllm.training.config import TrainConfig
    from openllm.training.loop import train

    root = nanogpt_checkout[0]
    source = root / "out-shakespeare-char" / "ckpt.pt"
    run = tmp_path / "run"
    assert main(["convert", "--input-dir", str(source), "--output-dir", str(run)]) == 0
    more = tmp_path / "more.txt"
    more.write_text(shakespeare_path.read_text(encoding="utf-8")[30000:50000], encoding="utf-8")
    options = dict(output_dir=str(run), data_file=str(more), batch_size=4, eval_every=2, eval_batches=1, log_every=100)
    train(TrainConfig(resume=str(run / "best_model.pt"), max_steps=32, **options), log=lambda _m: None)
    train(TrainConfig(resume="auto", max_steps=34, **options), log=lambda _m: None)  # a second resume keeps it too
    chain = f"converted from nanogpt weights at {source}, then trained 4 steps with openllm (to step 34)"
    final = load(run / "final_model.pt")["provenance"]
    assert final["source"] == chain and final["origin"]["optimizer_state"].startswith("imported"), final
    assert chain in (run / "README.md").read_text()
    export_checkpoint(run / "final_model.pt", tmp_path / "hf")
    assert chain in (tmp_path / "hf" / "README.md").read_text()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["openllm"]["provenance"]["source"] == chain
    # converting the export back keeps the whole chain
    assert main(["convert", "--input-dir", str(tmp_path / "hf"), "--output-dir", str(tmp_path / "again")]) == 0
    assert chain in load(tmp_path / "again" / "best_model.pt")["provenance"]["source"]


def test_meta_pkl_that_would_run_code_is_refused_unrun(nanogpt_checkout, tmp_path):
    from openllm.interop.convert import convert

    root, *_ = nanogpt_checkout
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "nano"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes((root / "out-shakespeare-char" / "ckpt.pt").read_bytes())
    (bad / "meta.pkl").write_bytes(pickle.dumps({"stoi": {"a": 0}, "itos": Payload()}))
    with pytest.raises(OpenLLMError, match=r"refers to (builtins|io)\.open: .* refusing to read it"):
        convert(bad, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    r = cli("convert", "--input-dir", str(bad / "ckpt.pt"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "refusing to read it" in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "meta, message",
    [
        ([1, 2, 3], "holds a list, not a dict"),
        ({"stoi": {"a": 0, "b": 0}}, r"ids are not 0\.\.N-1"),
        ({"stoi": {"a": 0}, "itos": {0: "b"}}, "'stoi' and 'itos' disagree"),
        ({"vocab_size": 50257}, "GPT-2 BPE meta.pkl: give --tokenizer"),
    ],
)
def test_meta_pkl_shapes_other_than_a_vocabulary_are_named(tmp_path, meta, message):
    from openllm.interop.nanogpt import read_meta

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(OpenLLMError, match=message):
        read_meta(tmp_path / "meta.pkl")


def test_vocabulary_of_another_size_is_refused_with_both_sizes(nanogpt_checkout, small_dataset, tmp_path):
    from openllm.interop.convert import convert

    root, *_ = nanogpt_checkout
    with pytest.raises(OpenLLMError, match=r"the tokenizer has 420 tokens but the embedding has 65 rows"):
        convert(root / "out-shakespeare-char", tmp_path / "out", tokenizer=str(small_dataset.path))
    assert not (tmp_path / "out").exists()


def test_gpt2_vocabulary_checkpoint_takes_the_users_tokenizer_and_loses_its_padding(tmp_path):
    """nanoGPT trains GPT-2-vocabulary models with 50,304 embedding rows (50,257 rounded up); converting one
    with a 50,257-token GPT-2 tokenizer.json drops the 47 rows no token id reaches, moments included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from openllm.interop.convert import convert
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({f"w{i}": i for i in range(len(vocab), 50256)})
    vocab["<|endoftext|>"] = 50256
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|endoftext|>"])
    raw.save(str(tmp_path / "tokenizer.json"))

    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=True, vocab_size=50304)
    model = GPT(ModelConfig(**args, dropout=0.0))
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.dim() >= 2]},
            {"params": [p for p in model.parameters() if p.dim() < 2]},
        ]
    )
    _, loss = model(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16)))
    loss.backward()
    opt.step()
    (tmp_path / "nano").mkdir()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": args, "iter_num": 1},
        tmp_path / "nano" / "ckpt.pt",
    )
    report = convert(tmp_path / "nano" / "ckpt.pt", tmp_path / "run", tokenizer=str(tmp_path / "tokenizer.json"))
    ckpt = load(tmp_path / "run" / "best_model.pt")
    assert (
        ckpt["config"]["vocab_size"] == 50257 and ckpt["model_state_dict"]["transformer.wte.weight"].shape[0] == 50257
    )
    assert torch.equal(
        ckpt["model_state_dict"]["transformer.wte.weight"], model.transformer.wte.weight[:50257].detach()
    )
    assert ckpt["optimizer_state_dict"]["state"][0]["exp_avg"].shape[0] == 50257
    assert any("47 padding rows" in n for n in report.notes)
