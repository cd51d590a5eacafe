"""lm-evaluation-harness on our models, on small local tasks written here (multiple choice, rolling
loglikelihood, generate-until): in process (`openllm eval --tasks`, our `openllm` harness model), against
`openllm serve` (the harness's `local-completions` model), each compared with the harness's `hf` model on the
exported directory: per-sample loglikelihoods agree within 1e-4 and greedy generations are identical.

The in-process comparison runs in CI (the test extras hold lm_eval); the server's is opt-in (`-m lmeval`: it
trains a longer run), and the request shapes it sends are checked in CI by tests/test_server.py.
"""

import json
import shutil
import sys

import pytest

from openllm.inference.loading import load_model
from openllm.inference.server import ServerLimits, create_app
from openllm.interop.export import export_checkpoint
from openllm.training.loop import train
from tests.conftest import cli, live_server, quiet, small_config

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
    aggregation: mean
    higher_is_better: true
"""
    )
    roll = data / "roll.jsonl"  # (documents longer than the test model's 32-token context: several windows each)
    roll.write_text("".join(json.dumps({"text": " ".join(CONTEXTS[i:] + CONTEXTS[:i])}) + "\n" for i in range(3)))
    (directory / "openllm_roll.yaml").write_text(
        f"""task: openllm_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {roll}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
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
    aggregation: mean
    higher_is_better: true
"""
    )


@pytest.mark.lmeval
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


TASKS = ["openllm_ll", "openllm_roll", "openllm_gen"]


def test_in_process_tasks_equal_hf_on_the_export(trained_run, tmp_path, monkeypatch):
    """`openllm eval --tasks` (our harness model, in process) against the harness's `hf` model on the export:
    the same per-sample loglikelihoods (multiple choice and rolling, within 1e-4), the same greedy generations,
    the same metrics; then through the command line, recorded in the run directory and its report."""
    pytest.importorskip("lm_eval")  # (the test extras install it: this fails loudly if the import is broken)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from openllm.inference.harness import run_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_checkpoint(trained_run, tmp_path / "hf")
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", tmp_path)
    loaded = load_model(trained_run)
    context = loaded.model.config.block_size
    ours = run_tasks(loaded, TASKS, include_path=tmp_path / "tasks", batch_size=3, log_samples=True)
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},add_bos_token=True,dtype=float32,device=cpu,max_length={context}",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True,
    )
    a, b = ({t: sorted(r["samples"][t], key=lambda s: s["doc_id"]) for t in TASKS} for r in (ours, theirs))
    lls = [
        (
            float(x[0][0] if isinstance(x[0], (list, tuple)) else x[0]),
            float(y[0][0] if isinstance(y[0], (list, tuple)) else y[0]),
        )
        for t in ("openllm_ll", "openllm_roll")
        for s, h in zip(a[t], b[t], strict=True)
        for x, y in zip(s["resps"], h["resps"], strict=True)
    ]
    assert len(lls) == 2 * len(CONTEXTS) + 3
    worst = max(abs(x - y) for x, y in lls)
    print(f"loglikelihoods: {len(lls)} compared, largest difference {worst:.2e}")
    assert worst < 1e-4
    gens = [(s["resps"][0][0], h["resps"][0][0]) for s, h in zip(a["openllm_gen"], b["openllm_gen"], strict=True)]
    print("generations:", gens)
    assert all(x == y for x, y in gens) and any(x for x, _ in gens)
    for task in TASKS:
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)

    # the command line: a table or JSON, recorded in the run directory (a copy: the shared run stays as it is)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    r = cli(
        "eval",
        "--model",
        str(run),
        "--tasks",
        "openllm_ll,openllm_roll",
        "--include-path",
        str(tmp_path / "tasks"),
        "--json",
        env=OFFLINE,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    shown = json.loads(r.stdout)
    assert shown["tasks"]["openllm_ll"]["acc"] == pytest.approx(ours["results"]["openllm_ll"]["acc,none"])
    assert shown["tasks"]["openllm_ll"]["acc_stderr"] == pytest.approx(ours["results"]["openllm_ll"]["acc_stderr,none"])
    assert shown["tasks"]["openllm_roll"]["bits_per_byte"] == pytest.approx(
        ours["results"]["openllm_roll"]["bits_per_byte,none"]
    )
    recorded = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert recorded[-1]["tasks"] == "openllm_ll, openllm_roll" and recorded[-1]["results"]["tasks"] == shown["tasks"]
    r = cli("report", str(run), "--print")
    assert r.returncode == 0, r.stderr
    assert f"openllm_ll: acc {shown['tasks']['openllm_ll']['acc']:.4f}" in r.stdout


OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_tasks_that_cannot_run_are_one_line(trained_run, tmp_path):
    """A task whose data is not there, an unknown task, a task that would need the network, shots for a zero-shot
    task, a wrong option: one error naming it (at the command line: exit 2, one line)."""
    pytest.importorskip("lm_eval")
    from openllm.core.errors import OpenLLMError
    from openllm.inference.harness import run_tasks

    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", tmp_path)
    (tmp_path / "ll.jsonl").unlink()
    cases = {  # (refused before the harness is imported)
        ("--tasks", "openllm_ll", "--stride", "4"): "--stride does not go with --tasks",
        ("--data", str(tmp_path / "ll.jsonl"), "--limit", "3"): "--limit goes with --tasks",
        ("--tasks", "openllm_ll", "--limit", "2.5"): "--limit",
        ("--tasks", "a,,b"): "names an empty task",
    }
    for args, message in cases.items():
        r = cli("eval", "--model", str(trained_run), *args, env=OFFLINE)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    # without the harness: one line naming the extra that brings it
    from openllm.inference.evaluate import evaluate_models

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "lm_eval", None)  # (as if not installed)
        with pytest.raises(OpenLLMError, match=r"--tasks needs the lm_eval package.*setup.sh eval"):
            evaluate_models([trained_run], tasks="openllm_ll")
    # in this process (the harness indexes its own 14,000 tasks once, 5 s): a local task whose data file is not
    # there; a task of the harness's, whose data would come from the Hub; an unknown name; shots asked of a task
    # that says it is zero-shot (the command line turns each into its one line, as every OpenLLMError)
    loaded = load_model(trained_run)
    with pytest.raises(OpenLLMError, match="task openllm_ll: its data could not be loaded"):
        run_tasks(loaded, ["openllm_ll"], include_path=tmp_path / "tasks")
    with pytest.raises(OpenLLMError, match="task hellaswag: its data could not be loaded"):
        run_tasks(loaded, ["hellaswag"])
    with pytest.raises(OpenLLMError, match="unknown task 'no_such_task'"):
        run_tasks(loaded, ["no_such_task"])
    write_tasks(tmp_path / "tasks", tmp_path)
    zero = (tmp_path / "tasks" / "openllm_ll.yaml").read_text().replace("task: openllm_ll", "task: openllm_zero")
    (tmp_path / "tasks" / "openllm_zero.yaml").write_text(zero + "num_fewshot: 0\n")
    with pytest.raises(OpenLLMError, match="--num-fewshot 2: task openllm_zero is zero-shot only"):
        run_tasks(loaded, ["openllm_zero"], include_path=tmp_path / "tasks", num_fewshot=2)
