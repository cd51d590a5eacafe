import json
import math

import numpy as np
import pytest
import torch

from openllm.model.config import ModelConfig
from openllm.model.gpt import GPT
from openllm.model.scoring import stream_nll, window_plan
from openllm.training.loop import train
from tests.conftest import cli, quiet, small_config


@pytest.fixture(scope="module")
def run(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run"
    train(small_config(small_dataset, out, eval_batches=100000, tensorboard=True), log=quiet)
    return out


def test_window_plan_scores_every_target_once():
    for n, seq, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (5, 16, 8)]:
        plan = window_plan(n, seq, stride)
        assert sum(s for _, _, s in plan) == n - 1
        assert all(e - b <= seq and s <= e - b for b, e, s in plan)


def test_sliding_windows_with_more_context_score_no_worse_than_disjoint():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=1, n_embd=16, block_size=16, dropout=0.0)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, 300).astype(np.uint16)
    total, count = stream_nll(model, tokens, 16, 16)
    assert count == 299 and math.isfinite(total)
    total2, count2 = stream_nll(model, tokens, 16, 4)
    assert count2 == 299 and total2 != total


def test_eval_matches_the_trainers_logged_validation_loss(run, small_dataset):
    r = cli(
        "eval",
        "--model",
        str(run / "best_model.pt"),
        "--data",
        str(small_dataset.path),
        "--seq-len",
        "32",
        "--stride",
        "32",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    best = torch.load(run / "best_model.pt", weights_only=True)
    assert result["loss"] == pytest.approx(best["best_validation_loss"], rel=1e-6)
    assert result["bits_per_byte"] > 0 and result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_eval_refuses_training_text_unless_told(run, small_corpus, tmp_path):
    r = cli("eval", "--model", str(run), "--data", str(small_corpus))
    assert r.returncode == 2 and "trained on" in r.stderr
    r = cli("eval", "--model", str(run), "--data", str(small_corpus), "--allow-training-data", "--json")
    assert r.returncode == 0, r.stderr
    other = tmp_path / "other.txt"
    other.write_text("Some other text, never seen.\n\nA second paragraph of it.\n")
    r = cli("eval", "--model", str(run), str(run / "final_model.pt"), "--data", str(other))
    assert r.returncode == 0 and r.stdout.count("\n") == 3 and "bits/byte" in r.stdout


def test_plot_and_tensorboard_files(run):
    assert (run / "training_curves.png").stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    r = cli("plot", str(run), "--output", str(run / "again.png"))
    assert r.returncode == 0 and (run / "again.png").is_file()


def test_generate_greedy_is_deterministic_and_long_prompts_are_truncated(run):
    a = cli("generate", "--model", str(run), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "10")
    b = cli("generate", "--model", str(run), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "10")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("ROMEO:")
    long = cli("generate", "--model", str(run), "--prompt", "word " * 400, "--max-new-tokens", "5", "--seed", "1")
    assert long.returncode == 0 and "dropped" in long.stderr and "Traceback" not in long.stderr


def test_generate_says_in_one_line_how_a_long_prompt_was_cut(run, capsys):
    from openllm.cli import main

    context = json.loads((run / "config.json").read_text())["block_size"]
    args = ["generate", "--model", str(run), "--max-new-tokens", "3", "--num-samples", "2", "--seed", "1"]
    assert main([*args, "--prompt", "word " * 400]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the prompt is ") and f"its last {context} tokens" in err


def test_generate_samples_use_independent_seeds(run, capsys):
    from openllm.cli import main

    def samples(seed: int, n: int) -> list[str]:
        args = ["generate", "--model", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "16", "--top-k", "0"]
        assert main([*args, "--temperature", "1.5", "--seed", str(seed), "--num-samples", str(n)]) == 0
        out = capsys.readouterr().out
        return [s for s in out.split("--- sample ") if s] if n > 1 else [out]

    two = samples(42, 2)
    assert two[0].split("---\n", 1)[1] == samples(42, 1)[0]  # the first sample is the single one of that seed
    assert two[1].split("---\n", 1)[1] != samples(43, 1)[0]  # (with seed + i it was seed 43's)
