"""A run's report (its README.md): every item a fresh run leaves there, with the figures taken from the files
they come from, and `openllm report` adding an evaluation run later."""

from __future__ import annotations

import json
import math
import re
import subprocess

import torch

from openllm.checkpoint import format as ck
from tests.conftest import ROOT, cli, small_args


def expected_commit() -> str:
    if not (ROOT / ".git").exists():
        return "not run from a git checkout"
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_a_fresh_run_reports_everything_and_report_adds_a_later_evaluation(small_dataset, small_corpus, tmp_path):
    run = tmp_path / "run"
    r = cli(*small_args(small_dataset, run, "--max-steps", "3", "--sample-tokens", "12", "--sample-prompt", "ROMEO:"))
    assert r.returncode == 0, r.stderr
    text = (run / "README.md").read_text()
    info = ck.read_info(ck.load_checkpoint(run / "final_model.pt", mmap=True))
    meta = small_dataset.meta
    stats, model = info.training_stats, info.model_info
    for needed in [
        f"{meta['documents_read']:,} read, {meta['duplicates_dropped']:,} duplicates dropped",  # data
        f"{meta['train_tokens']:,} training / {meta['val_tokens']:,} validation",
        str(meta["inputs"][0]["path"]),
        f"tokenizer: {meta['tokenizer']}",  # tokenizer
        f"parameters: {model['parameters']:,}; training FLOPs per token: {model['flops_per_token']:,}",  # model
        "optimizer adamw, learning rate",  # recipe
        f"steps: {stats['total_steps']:,}",
        f"wall time: {stats['elapsed_seconds']:.1f} s",  # wall time, tokens/s, MFU
        f"{round(stats['average_tokens_per_second']):,} tokens/s on average",
        "model FLOPs utilisation: not measured",
        f"best validation loss: {stats['best_validation_loss']:.4f} at step {stats['best_step']}",
        "![training curves](training_curves.png)",
        f"OpenLLM commit: {expected_commit()}",
        f"torch {torch.__version__}",
    ]:
        assert needed in text, needed
    assert (run / "training_curves.png").is_file()
    # bits per byte from the validation split's bytes per token
    bpb = stats["best_validation_loss"] / math.log(2) / (meta["val_text_bytes"] / meta["val_tokens"])
    assert f"bits per byte {bpb:.4f}" in text
    final = info.validation_log[-1]
    assert f"final validation loss: {final['validation_loss']:.4f} at step {final['step']}" in text
    # the sample the command printed, and the machine
    sample = (run / "sample.txt").read_text()
    assert sample.startswith("ROMEO:") and sample in r.stdout and sample in text
    env = json.loads((run / "environment.json").read_text())
    assert f"processor: {env['cpu']}, {env['cpu_count']} cores usable" in text and "GPUs: none" in text
    assert "None yet" in text  # no evaluation so far
    # an evaluation run later is recorded in the run directory; `openllm report` puts it in the report
    r = cli("eval", "--model", str(run), "--data", str(small_corpus), "--allow-training-data", "--json")
    assert r.returncode == 0, r.stderr
    loss = json.loads(r.stdout)["loss"]
    record = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert record["results"]["loss"] == loss and record["checkpoint"] == "best_model.pt"
    assert record["step"] == stats["best_step"]
    r = cli("report", str(run))
    assert r.returncode == 0, r.stderr
    rebuilt = (run / "README.md").read_text()
    row = next(line for line in rebuilt.splitlines() if line.startswith("| 20") and str(small_corpus) in line)
    assert f"loss {loss:.4f}" in row and f"step {stats['best_step']}" in row
    assert re.sub(r"## Evaluations.*?## Sample", "", rebuilt, flags=re.S) == re.sub(
        r"## Evaluations.*?## Sample", "", text, flags=re.S
    )  # everything else as the run wrote it


def test_report_of_what_is_not_a_run_is_one_line(tmp_path):
    r = cli("report", str(tmp_path))
    assert r.returncode == 2 and "is not a run directory" in r.stderr and r.stderr.strip().count("\n") == 0
