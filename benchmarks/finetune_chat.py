#!/usr/bin/env python3
"""Does fine-tuning teach a base model to answer? The bundled tiny base model, fine-tuned on synthetic
conversations with verifiable answers (openllm.data.synthetic), against itself before fine-tuning, on held-out
conversations none of which (by question) was among the training ones.

    python benchmarks/finetune_chat.py [--base RUN] [--train 3000] [--held-out 300] [--epochs 8]
                                       [--learning-rate 2e-3] [--lora-rank R] [--output docs/benchmarks.md | -]
                                       [--smoke]

The base is `openllm train`'s default job (the tiny preset on the bundled corpus), trained here unless
``--base`` names a run. "before" is the base with the chat tokens added as a fine-tune starts (their rows the
mean of the others), scored the same way. Both are scored by ``openllm eval --chat-data``'s function: the loss
on the assistant's tokens and the share of greedy answers equal to the expected one. The fine-tune's wall time
is measured around the `openllm finetune` command. ``--smoke`` runs every part in seconds (no figures worth
keeping, nothing written).

The learning rate is this benchmark's own, 2e-3 (a third of the base's 6e-3): `openllm finetune`'s default, a
tenth of the base's, learns the sums and differences much more slowly on so small a set (docs/benchmarks.md has
both).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import processor, publish  # noqa: E402


def openllm(*args: str) -> float:
    """Run an openllm command (its output shown); its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "openllm", *args], check=True)
    return time.perf_counter() - t0


def held_out(n_train: int, n_held: int) -> tuple[list[dict], list[tuple[str, dict]]]:
    """Training conversations, and held-out (task, conversation) pairs whose question is not among the
    training questions."""
    from openllm.data.synthetic import conversations, tasks_and_conversations

    train = conversations(n_train, seed=0)
    seen = {c["messages"][0]["content"] for c in train}
    held = []
    for task, c in tasks_and_conversations(seed=1):
        if (q := c["messages"][0]["content"]) not in seen:
            seen.add(q)
            held.append((task, c))
            if len(held) == n_held:
                return train, held
    raise AssertionError("unreachable: the stream is endless")


def before_fine_tuning(base: Path):
    """The base model as a fine-tune starts from it: chat tokens added, their rows the mean of the others."""
    from openllm.data.chat import with_chat_tokens
    from openllm.finetune import load_base
    from openllm.inference.loading import LoadedModel
    from openllm.model import build_model
    from openllm.training.setup import load_base_weights

    start = load_base(str(base))
    tokenizer = with_chat_tokens(start.tokenizer)
    model = build_model(start.model_config.replace(vocab_size=tokenizer.vocab_size, dropout=0.0))
    load_base_weights(model, start, lambda _m: None)
    return LoadedModel(model.eval(), tokenizer, base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a trained base run (default: train `openllm train`'s default job here)")
    ap.add_argument("--train", type=int, default=3000, help="training conversations")
    ap.add_argument("--held-out", type=int, default=300, help="held-out conversations scored")
    ap.add_argument("--epochs", type=float, default=8.0, help="fine-tuning epochs")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full fine-tuning)")
    ap.add_argument("--learning-rate", type=float, default=2e-3, help="the fine-tune's (0: openllm finetune's default)")
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="'-': print only")
    ap.add_argument("--smoke", action="store_true", help="every part in seconds (tiny sizes, nothing written)")
    a = ap.parse_args()
    from openllm.inference.evaluate import evaluate_chat
    from openllm.inference.loading import load_model

    work = Path(tempfile.mkdtemp(prefix="finetune-chat-"))
    n_train, n_held = (60, 20) if a.smoke else (a.train, a.held_out)
    train, held = held_out(n_train, n_held)
    for name, rows in (("train.jsonl", train), ("held.jsonl", [c for _, c in held])):
        (work / name).write_text("".join(json.dumps(c) + "\n" for c in rows))
    base_seconds = None
    if a.base:
        base = Path(a.base)
    else:
        base = work / "base"
        steps = []
        if a.smoke:  # a slice of the bundled corpus and a small vocabulary: the same paths in seconds
            corpus = (ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
            (work / "corpus.txt").write_text(corpus[:60_000], encoding="utf-8")
            steps = ["--data-file", str(work / "corpus.txt"), "--vocab-size", "420", "--max-steps", "4"]
            steps += ["--eval-every", "2", "--save-every", "2", "--batch-size", "4", "--seq-len", "64"]
        base_seconds = openllm("train", "--output-dir", str(base), "--sample-tokens", "0", *steps)
    tune = ["--max-steps", "4", "--eval-every", "2", "--save-every", "2"] if a.smoke else ["--epochs", f"{a.epochs:g}"]
    if a.lora_rank:
        tune += ["--lora-rank", str(a.lora_rank)]
    if a.learning_rate:
        tune += ["--learning-rate", str(a.learning_rate)]
    seconds = openllm(
        "finetune", "--model", str(base), "--data", str(work / "train.jsonl"), "--output-dir", str(work / "ft"),
        "--batch-size", "16", "--seq-len", "64", "--sample-tokens", "0", *tune,
    )  # fmt: skip
    held_files = [str(work / "held.jsonl")]
    before = evaluate_chat(before_fine_tuning(base), held_files, 16, 16, "cpu", per_conversation=True)
    after = evaluate_chat(load_model(work / "ft" / "best_model.pt"), held_files, 16, 16, "cpu", per_conversation=True)
    tasks = [task for task, _ in held]
    kind = f"LoRA rank {a.lora_rank}" if a.lora_rank else "full fine-tuning"
    lines = [
        "## Fine-tuning a base model into an assistant (benchmarks/finetune_chat.py)",
        "",
        f"`python benchmarks/finetune_chat.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + " on "
        f"{processor()}: the tiny base (`openllm train`'s default job"
        + (f", trained here in {base_seconds:.0f} s" if base_seconds else f", {base}")
        + f"), {kind} on {len(train):,} synthetic conversations (one-digit sums and differences, a list of "
        f"words backwards, answering from a sentence) for {a.epochs:g} epochs in {seconds:.0f} s; scored on "
        f"{len(held):,} held-out conversations whose questions it never saw.",
        "",
        "| model | loss on the assistant's tokens | exact-match answers |",
        "| --- | ---: | ---: |",
        f"| base, before fine-tuning | {before['assistant_loss']:.3f} | {before['exact_match']:.1%} |",
        f"| fine-tuned (best_model.pt) | {after['assistant_loss']:.3f} | {after['exact_match']:.1%} |",
        "",
        "| task | held-out conversations | exact match before | exact match after |",
        "| --- | ---: | ---: | ---: |",
    ]
    for task in sorted(set(tasks)):
        picked = [i for i, t in enumerate(tasks) if t == task]
        was, now = (sum(result["correct"][i] for i in picked) / len(picked) for result in (before, after))
        lines.append(f"| {task} | {len(picked)} | {was:.1%} | {now:.1%} |")
    shutil.rmtree(work, ignore_errors=True)
    if a.smoke or a.output == "-":
        print("\n".join(lines))
    else:
        publish(a.output, "Fine-tuning a base model into an assistant", lines)


if __name__ == "__main__":
    main()
