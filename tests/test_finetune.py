"""`openllm finetune`: a base model (ours, or a Hugging Face directory) fine-tuned on conversations with every
guarantee of training: checkpoints that verify, the best model, exact resume after a kill (full and LoRA),
the loss on what the assistant says only, rows that never see each other, LoRA exported as merged weights."""

from __future__ import annotations

import json
import shutil
import signal

import httpx
import numpy as np
import pytest
import torch
import transformers

from openllm.data.chat import encode_chat
from openllm.data.conversations import load_conversations
from openllm.data.synthetic import write_jsonl
from openllm.inference.loading import load_model
from tests.conftest import cli, live_server, load

RUN = ["--batch-size", "4", "--seq-len", "64", "--eval-every", "4", "--save-every", "4", "--eval-batches", "2",
       "--sample-tokens", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    write_jsonl(path, 200, seed=0)
    return path


def finetune(base, chats, out, *extra, env=None):
    return cli("finetune", "--model", str(base), "--data", str(chats), "--output-dir", str(out), *RUN, *extra, env=env)


# (full fine-tuning resumes through the same mechanism as any run, test_train.py's exact resumes; -m slow runs it)
@pytest.mark.parametrize("lora", [pytest.param([], marks=pytest.mark.slow), ["--lora-rank", "4"]], ids=["full", "lora"])
def test_a_killed_finetune_resumes_bit_identically(llama_run, chats, tmp_path, lora):
    steps = ["--max-steps", "8", *lora]
    r = finetune(llama_run, chats, tmp_path / "ref", *steps)
    assert r.returncode == 0, r.stderr
    r = finetune(llama_run, chats, tmp_path / "cut", *steps, env={"OPENLLM_FAULT": "step:6"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = finetune(llama_run, chats, tmp_path / "cut", *steps, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr
    a, b = load(tmp_path / "ref" / "final_model.pt"), load(tmp_path / "cut" / "final_model.pt")
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 9))
    for name in ("best_model.pt", "final_model.pt"):
        assert cli("verify", str(tmp_path / "ref" / name)).returncode == 0
    # the chat tokens were added to the tokenizer and the model grew by them
    base_vocab = load(llama_run / "best_model.pt")["config"]["vocab_size"]
    assert a["config"]["vocab_size"] == base_vocab + 2
    if lora:  # adapters (and the grown embedding) only, with the base they fit
        assert "lora_base" in a and any(".lora_A." in k for k in a["model_state_dict"])
        assert not any(k.endswith(".attn.c_proj.weight") or ".mlp." in k for k in a["model_state_dict"])
    loaded = load_model(tmp_path / "ref" / "best_model.pt")  # (LoRA: the adapters merged into the base)
    assert loaded.tokenizer.chat_template and loaded.model.config.vocab_size == base_vocab + 2


def test_rows_never_see_each_other_and_only_the_assistant_carries_loss(small_dataset, chats, tmp_path):
    from openllm.data.conversations import prepare_conversations
    from openllm.model import build_model
    from openllm.model.config import model_config_for
    from openllm.training.chatdata import IGNORE, ConversationSampler, inputs_targets

    chat_set = prepare_conversations([chats], small_dataset.path / "tokenizer.model", tmp_path / "set", max_tokens=65)
    tok = chat_set.tokenizer
    sampler = ConversationSampler(chat_set.train, seed=0, pad_id=0)
    x, y = inputs_targets(sampler.windows(0, 4))
    # the targets are the next ids where the mask is set: what the assistant says and its end of turn
    for row in range(4):
        ids, mask = chat_set.train[int(sampler._perm[row])]
        n = len(ids) - 1
        assert torch.equal(x[row, :n], torch.from_numpy(ids[:-1]))
        want = np.where(mask[1:], ids[1:], IGNORE)
        assert torch.equal(y[row, :n], torch.from_numpy(want)) and bool((y[row, n:] == IGNORE).all())
        assert tok.decode([int(t) for t in y[row] if t != IGNORE]).strip() in tok.decode(ids.tolist())
    model = build_model(model_config_for("tiny", vocab_size=tok.vocab_size, dropout=0.0)).eval()

    def row_losses(inputs):
        logits, _ = model(inputs, y)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none").sum(
            1
        )

    with torch.no_grad():
        before = row_losses(x)
        changed = x.clone()
        changed[0, :5] = (changed[0, :5] + 1) % tok.vocab_size  # another conversation in row 0
        after = row_losses(changed)
    assert torch.equal(before[1:], after[1:]) and not torch.equal(before[:1], after[:1])


def test_the_training_ids_are_the_ids_transformers_makes_from_the_exported_template(llama_run, chats, tmp_path):
    r = finetune(llama_run, chats, tmp_path / "ft", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--checkpoint", str(tmp_path / "ft" / "best_model.pt"), "--output-dir", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    chat_set = load_conversations(tmp_path / "ft" / "conversations")
    messages = json.loads(chats.read_text().splitlines()[0])["messages"]
    ids, _ = encode_chat(chat_set.tokenizer, messages)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    got = hf_tok.apply_chat_template(messages, tokenize=True)
    assert list(getattr(got, "input_ids", got)) == ids
    # `openllm eval --chat-data` scores the fine-tuned model on conversations; text-only options are refused by name
    r = cli("eval", "--model", str(tmp_path / "ft"), "--chat-data", str(chats), "--json")
    assert r.returncode == 2 and "holds conversations" in r.stderr and "was fine-tuned on" in r.stderr, r.stderr
    r = cli("eval", "--model", str(tmp_path / "ft"), "--chat-data", str(chats), "--json", "--allow-training-data")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["conversations"] == 200 and 0 <= report["exact_match"] <= 1 and report["assistant_loss"] > 0
    # the run's report names its conversations, and holds the evaluation once `openllm report` rebuilds it
    assert "fine-tuned from" in (tmp_path / "ft" / "README.md").read_text()
    assert cli("report", str(tmp_path / "ft")).returncode == 0
    assert (
        f"exact match {report['exact_match']:.1%} of 200 conversations (on training data"
        in (tmp_path / "ft" / "README.md").read_text()
    )
    r = cli("eval", "--model", str(tmp_path / "ft"), "--chat-data", str(chats), "--seq-len", "32")
    assert r.returncode == 2 and "--seq-len goes with --data" in r.stderr, r.stderr
    # the server feeds the model the same ids (asking for the assistant's turn) and stops at the end of the turn
    from openllm.inference.server import ServerLimits, create_app

    loaded = load_model(tmp_path / "ft" / "best_model.pt")
    im_end = loaded.tokenizer.piece_to_id("<|im_end|>")
    app = create_app(loaded, "ft", ServerLimits(max_tokens=8, max_queue=4))
    ask = messages[:-1]
    prompt = encode_chat(loaded.tokenizer, ask, add_generation_prompt=True)[0]
    assert prompt == ids[: len(prompt)]
    with live_server(app) as url:
        body = {"messages": ask, "max_tokens": 8, "temperature": 0, "logit_bias": {str(im_end): 100}}
        answer = httpx.post(url + "/v1/chat/completions", json=body).json()
        usage = answer["usage"]
    assert usage["prompt_tokens"] == len(prompt), answer
    assert answer["choices"][0]["finish_reason"] == "stop" and usage["completion_tokens"] == 0, answer


def test_lora_exports_the_merged_weights(llama_run, chats, tmp_path):
    r = finetune(llama_run, chats, tmp_path / "ft", "--max-steps", "4", "--lora-rank", "4", "--lora-alpha", "64")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--checkpoint", str(tmp_path / "ft" / "best_model.pt"), "--output-dir", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    ours = load_model(tmp_path / "ft" / "best_model.pt").model  # merged on loading
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    base = load_model(llama_run / "best_model.pt").model
    with torch.no_grad():
        assert (ours(x)[0] - theirs(x).logits).abs().max().item() < 1e-4
        base_logits = base(x.clamp(max=base.config.vocab_size - 1))[0]
    assert not torch.allclose(
        ours(x.clamp(max=base.config.vocab_size - 1))[0][..., : base_logits.shape[-1]], base_logits
    )
    # GGUF: the merged weights too, with the chat template and its end-of-turn token
    import gguf

    r = cli("export", "--checkpoint", str(tmp_path / "ft" / "best_model.pt"), "--output-dir", str(tmp_path / "g"),
            "--format", "gguf", "--gguf-dtype", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    tok = load_model(tmp_path / "ft" / "best_model.pt").tokenizer
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == tok.piece_to_id("<|im_end|>")
    r = cli("export", "--checkpoint", str(llama_run / "best_model.pt"), "--output-dir", str(tmp_path / "g0"),
            "--format", "gguf", "--gguf-dtype", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    before = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "g0" / "model.gguf").tensors}
    assert not np.allclose(tensors["blk.0.attn_q.weight"], before["blk.0.attn_q.weight"])  # an adapter, merged in
    assert np.array_equal(tensors["blk.0.ffn_down.weight"], before["blk.0.ffn_down.weight"])  # frozen, untouched


def test_a_hugging_face_directory_is_converted_on_the_fly_and_exports_back(small_dataset, chats, tmp_path):
    vocab = small_dataset.tokenizer.vocab_size
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    shutil.copy(small_dataset.path / "tokenizer.model", tmp_path / "qwen3" / "tokenizer.model")
    r = finetune(tmp_path / "qwen3", chats, tmp_path / "ft", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--checkpoint", str(tmp_path / "ft" / "best_model.pt"), "--output-dir", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(back).__name__ == "Qwen3ForCausalLM" and back.config.vocab_size == vocab + 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--lora-rank", "4"], "unrecognized arguments: --lora-rank"),
        (["finetune", "--model", "m", "--data", "c.jsonl", "--data-file", "x.txt"], "unrecognized arguments: --data-file"),
        (["finetune", "--data", "c.jsonl"], "give --model"),
        (["finetune", "--model", "m"], "give --data"),
        (["finetune", "--model", "m", "--data", "c.jsonl", "--epochs", "2", "--max-steps", "3"], "--epochs or --max-steps"),
        (["finetune", "--model", "m", "--data", "c.jsonl", "--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
        (["finetune", "--model", "m", "--data", "c.jsonl", "--lora-rank", "2", "--lora-targets", "q,zz"], "--lora-targets"),
        (["finetune", "--model", "m", "--data", "c.jsonl", "--epochs", "0"], "--epochs must be"),
        (["finetune", "--model", "/no/such/model", "--data", "c.jsonl"], "--model not found"),
    ],
)  # fmt: skip
def test_bad_finetune_options_are_one_line_errors(tmp_path, args, message):
    r = cli(*args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.llamacpp
def test_llama_cpp_applies_the_gguf_chat_template_to_the_same_ids_and_stops_at_the_end_of_turn(
    llama_run, chats, tmp_path
):
    """Opt-in (`pytest -m llamacpp`): needs llama-cpp-python, which builds llama.cpp from source. The GGUF file's
    `tokenizer.chat_template`, rendered by llama-cpp-python's Jinja formatter and tokenized by llama.cpp, gives the
    ids training used; its greedy chat completion is ours, ending at `<|im_end|>` (the file's end-of-turn id)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert finetune(llama_run, chats, tmp_path / "ft", "--max-steps", "8").returncode == 0
    r = cli("export", "--checkpoint", str(tmp_path / "ft" / "best_model.pt"), "--output-dir", str(tmp_path / "g"),
            "--format", "gguf", "--gguf-dtype", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ours = load_model(tmp_path / "ft" / "best_model.pt")
    tok = ours.tokenizer
    llm = Llama(model_path=str(tmp_path / "g" / "model.gguf"), n_ctx=128, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    im_end = tok.piece_to_id("<|im_end|>")
    for line in chats.read_text().splitlines()[:4]:
        ask = json.loads(line)["messages"][:-1]
        bos, eos = (tok.id_to_piece(i) if i is not None else "" for i in (tok.bos_id, tok.eos_id))
        prompt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=ask).prompt
        ids = encode_chat(tok, ask, add_generation_prompt=True)[0]
        # as llama-cpp-python's chat handler tokenizes a rendered template: its special tokens parsed, no bos added
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        want: list[int] = []
        with torch.no_grad():
            while len(want) < 12 and (not want or want[-1] != im_end):
                want.append(int(ours.model(torch.tensor([ids + want]))[0][0, -1].argmax()))
        answer = llm.create_chat_completion(messages=ask, max_tokens=12, temperature=0.0)["choices"][0]
        ended = want[-1] == im_end
        assert answer["finish_reason"] == ("stop" if ended else "length"), answer
        assert answer["message"]["content"] == tok.decode(want[:-1] if ended else want), answer


def test_every_counted_target_weighs_the_same_whatever_the_micro_batches(llama_run, chats, tmp_path):
    """Rows carry different numbers of counted targets: 2 micro-batches of 2 rows give the losses and weights
    of 1 micro-batch of 4 (a mean per micro-batch would weigh a short answer's tokens more)."""
    base = [*RUN[4:], "--max-steps", "2", "--dtype", "float32"]  # (RUN without its batch size and length)
    for name, shape in (
        ("one", ["--batch-size", "4"]),
        ("two", ["--batch-size", "2", "--gradient-accumulation-steps", "2"]),
    ):
        r = cli("finetune", "--model", str(llama_run), "--data", str(chats), "--output-dir", str(tmp_path / name),
                "--seq-len", "64", *base, *shape)  # fmt: skip
        assert r.returncode == 0, r.stderr
    one, two = load(tmp_path / "one" / "final_model.pt"), load(tmp_path / "two" / "final_model.pt")
    assert [r["loss"] for r in two["training_log"]] == pytest.approx([r["loss"] for r in one["training_log"]], rel=1e-5)
    for k, v in one["model_state_dict"].items():
        assert torch.allclose(two["model_state_dict"][k], v, atol=1e-5), k
