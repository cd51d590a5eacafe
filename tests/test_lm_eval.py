"""lm-evaluation-harness against `openllm serve` (its `local-completions` model) and against the exported
directory in `transformers` (its `hf` model), on two small local tasks written here: per-sample
loglikelihoods agree within 1e-4 and greedy generations are identical.

Opt-in (`pytest -m lmeval`): it needs the `lm_eval` package, which CI does not install. The request shapes it
sends (token-id prompts, echo + logprobs, max_tokens 1) are checked in CI by tests/test_server.py.
"""

import json

import pytest

from openllm.inference.loading import load_model
from openllm.inference.server import ServerLimits, create_app
from openllm.interop.export import export_checkpoint
from openllm.training.loop import train
from tests.conftest import live_server, quiet, small_config

pytestmark = pytest.mark.lmeval

CONTEXTS = ["ROMEO: But soft, what light", "JULIET: O Romeo, Romeo", "KING: My lords", "The night is", "First Citizen:"]
CHOICES = [" through yonder window", " wherefore art thou", " and gentlemen", " come", " speak"]


def write_tasks(directory, data):
    ll = data / "ll.jsonl"
    ll.write_text(
        "".join(
            json.dumps({"context": c, "choices": [a, b], "label": 0}) + "\n"
            for c, a, b in zip(CONTEXTS, CHOICES, CHOICES[1:] + CHOICES[:1], strict=True)
        )  # fmt: skip
    )
    gen = data / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": c, "target": "x"}) + "\n" for c in CONTEXTS))
    (directory / "openllm_ll.yaml").write_text(
        f"""task: openllm_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ll}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
    )
    (directory / "openllm_gen.yaml").write_text(
        f"""task: openllm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""
    )


def test_local_completions_against_the_server_equal_hf_on_the_export(small_dataset, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    train(
        small_config(small_dataset, run, max_steps=200, eval_every=200, save_every=200, learning_rate=3e-3), log=quiet
    )
    export_checkpoint(run, tmp_path / "hf")
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", tmp_path)
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    loaded = load_model(run)
    context = loaded.model.config.block_size
    results = {}
    with live_server(create_app(loaded, "mine", ServerLimits())) as url:
        results["server"] = simple_evaluate(
            model="local-completions",
            model_args=f"model=mine,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tmp_path / 'hf'},tokenized_requests=True,add_bos_token=True,max_length={context}",
            tasks=["openllm_ll", "openllm_gen"],
            task_manager=tasks,
            log_samples=True,
        )
    results["hf"] = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},add_bos_token=True,dtype=float32,device=cpu,max_length={context}",
        tasks=["openllm_ll", "openllm_gen"],
        task_manager=tasks,
        log_samples=True,
    )
    server, hf = (
        {t: sorted(r["samples"][t], key=lambda s: s["doc_id"]) for t in ("openllm_ll", "openllm_gen")}
        for r in (results["server"], results["hf"])
    )
    lls = [
        (float(a[0][0]), float(b[0][0]))
        for s, h in zip(server["openllm_ll"], hf["openllm_ll"], strict=True)
        for a, b in zip(s["resps"], h["resps"], strict=True)
    ]
    assert len(lls) == 2 * len(CONTEXTS)
    worst = max(abs(a - b) for a, b in lls)
    print(f"loglikelihoods: {len(lls)} compared, largest difference {worst:.2e}")
    assert worst < 1e-4
    gens = [(s["resps"][0][0], h["resps"][0][0]) for s, h in zip(server["openllm_gen"], hf["openllm_gen"], strict=True)]
    print("generations:", gens)
    # the same tokens: the server's text is the continuation as it joins the prompt (decoded in the prompt's
    # context, as vLLM decodes too), while `hf` decodes the generated tokens alone, which drops the leading
    # space a SentencePiece piece starts with; nothing else may differ
    assert all(a == b or (a.startswith(" ") and a[1:] == b) for a, b in gens) and any(a for a, _ in gens)
