#!/usr/bin/env python3
"""Quality per CPU-second of the `tiny` preset against nanoGPT's CPU recipe, side by side.

    python benchmarks/tiny_quality.py [--skip-baseline]

Split: tiny Shakespeare, first 90% of the characters for training (TRAIN.txt), last 10% for
validation (VAL.txt), as nanoGPT's shakespeare_char preparation does.

Baseline: nanoGPT's documented CPU configuration (4 layers, 4 heads, 128 wide, context 64, batch
12, 2000 iterations, dropout 0, character vocabulary, lr 1e-3 -> 1e-4 with 100 warmup steps,
AdamW betas (0.9, 0.99), weight decay 0.1, no bias, evaluation of 20 batches every 250 steps),
written here as a plain PyTorch loop on this project's GPT model. Its validation loss is
measured on all of VAL.txt with disjoint 64-character windows.

OpenLLM: `openllm train --data-file TRAIN.txt --validation-data VAL.txt --model-size tiny
--device cpu` with the preset's defaults (and validation every eighth of the run, to see when it gets
where), then `openllm eval --json` on VAL.txt; the wall time covers both commands (preparation,
tokenizer training, training, evaluation, process start-up). The time OpenLLM needs to reach
nanoGPT's final validation loss is read from the trainer's validation lines as they are printed
(wall time since the start, everything before included), each converted to bits per byte with the
tokens-per-byte of VAL.txt under the run's tokenizer.

Bits per byte = total validation loss in bits / bytes of VAL.txt (ASCII: one byte per character).
Results are printed and written to docs/benchmarks.md (quality section).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import write_section  # noqa: E402

CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def nanogpt_cpu_baseline(train_text: str, val_text: str) -> dict:
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    chars = sorted(set(train_text + val_text))
    stoi = {c: i for i, c in enumerate(chars)}
    train = np.array([stoi[c] for c in train_text], dtype=np.int64)
    val = np.array([stoi[c] for c in val_text], dtype=np.int64)
    torch.manual_seed(1337)
    block, batch, iters, warmup, lr, min_lr = 64, 12, 2000, 100, 1e-3, 1e-4
    model = GPT(
        ModelConfig(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, block_size=block, dropout=0.0, bias=False)
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99)
    )
    gen = torch.Generator().manual_seed(1337)

    def get_batch(data):
        ix = torch.randint(len(data) - block, (batch,), generator=gen)
        x = torch.stack([torch.from_numpy(data[i : i + block]) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block]) for i in ix.tolist()])
        return x, y

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (iters - warmup)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    start = time.perf_counter()
    for it in range(iters + 1):
        if it % 250 == 0:  # nanoGPT's periodic estimate: 20 batches of each split
            model.eval()
            with torch.no_grad():
                for data in (train, val):
                    for _ in range(20):
                        model(*get_batch(data))
            model.train()
        if it == iters:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        _, loss = model(*get_batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - start
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - 1, block * 32):
            rows = [val[i : i + block + 1] for i in range(s, min(s + block * 32, len(val) - 1), block)]
            rows = [r for r in rows if len(r) == block + 1]
            if not rows:
                continue
            t = torch.from_numpy(np.stack(rows))
            _, loss = model(t[:, :-1], t[:, 1:])
            total += loss.item() * t[:, 1:].numel()
            count += t[:, 1:].numel()
    loss = total / count
    return {"seconds": train_seconds, "val_loss_per_char": loss, "bits_per_byte": loss / math.log(2)}


def openllm_run(train_file: Path, val_file: Path, work: Path, extra: list[str]) -> dict:
    exe = [sys.executable, "-m", "openllm"]
    start = time.perf_counter()
    run_dir = work / "openllm-run"
    from openllm.model.config import get_preset

    steps = get_preset("tiny").max_steps
    for i, arg in enumerate(extra):
        if arg == "--max-steps":
            steps = int(extra[i + 1])
    proc = subprocess.Popen(
        [
            *exe,
            "train",
            "--data-file",
            str(train_file),
            "--validation-data",
            str(val_file),
            "--model-size",
            "tiny",
            "--device",
            "cpu",
            "--output-dir",
            str(run_dir),
            "--eval-every",
            str(max(1, steps // 8)),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    curve = []  # (seconds since the start, step, validation loss per token) as the trainer reports them
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"step (\d+): validation loss ([0-9.]+)", line)
        if m:
            curve.append((time.perf_counter() - start, int(m.group(1)), float(m.group(2))))
    if proc.wait() != 0:
        raise SystemExit(f"openllm train failed (exit {proc.returncode})")
    out = subprocess.run(
        [*exe, "eval", "--model", str(run_dir), "--data", str(val_file), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    seconds = time.perf_counter() - start
    result = json.loads(out)
    cfg = json.loads((run_dir / "training_config.json").read_text())
    per_token = result["tokens"] / result["bytes"] / math.log(2)  # nats per token -> bits per byte
    return {
        "seconds": seconds,
        "curve": [(t, step, loss * per_token) for t, step, loss in curve],
        "bits_per_byte": result["bits_per_byte"],
        "loss_per_token": result["loss"],
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        "steps": cfg["max_steps"],
        "vocab": json.loads((run_dir / "config.json").read_text())["vocab_size"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-baseline", action="store_true", help="only run openllm (for tuning)")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("extra", nargs="*", help="extra `openllm train` options (tuning only; the record uses none)")
    args = p.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory(prefix="openllm-quality-") as tmp:
        work = Path(tmp)
        (work / "TRAIN.txt").write_text(text[:cut], encoding="utf-8")
        (work / "VAL.txt").write_text(text[cut:], encoding="utf-8")
        ours = openllm_run(work / "TRAIN.txt", work / "VAL.txt", work, args.extra)
        print(
            f"openllm tiny: {ours['bits_per_byte']:.3f} bits/byte in {ours['seconds']:.1f} s wall "
            f"({ours['steps']} steps, vocab {ours['vocab']}); curve "
            + ", ".join(f"{t:.0f}s:{bpb:.3f}" for t, _, bpb in ours["curve"]),
            flush=True,
        )
        if args.skip_baseline:
            return
        base = nanogpt_cpu_baseline(text[:cut], text[cut:])
        print(
            f"nanoGPT CPU recipe: {base['bits_per_byte']:.3f} bits/byte (loss {base['val_loss_per_char']:.3f} "
            f"nats/char) in {base['seconds']:.1f} s"
        )
    time_ratio = ours["seconds"] / base["seconds"]
    reached = next(((t, step) for t, step, bpb in ours["curve"] if bpb <= base["bits_per_byte"]), None)
    reach_text = (
        f"{reached[0]:.1f} s ({reached[0] / base['seconds']:.2f}x nanoGPT's time; step {reached[1]})"
        if reached
        else "not reached"
    )
    print(f"openllm reaches nanoGPT's final {base['bits_per_byte']:.3f} bits/byte at {reach_text}")
    lines = [
        "## Quality per CPU-second: `tiny` against nanoGPT's CPU recipe (benchmarks/tiny_quality.py)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. Tiny Shakespeare, first 90% of the characters for training, last 10% "
        f"({ours['bytes']:,} bytes) for validation; both measured in the same run.",
        "",
        "| run | wall time | validation bits/byte |",
        "| --- | --- | --- |",
        f"| nanoGPT CPU recipe (char-level, 2000 iterations; training loop only) | {base['seconds']:.1f} s | "
        f"{base['bits_per_byte']:.3f} (loss {base['val_loss_per_char']:.3f} nats/char) |",
        f"| `openllm train ... --model-size tiny` + `openllm eval` (everything included; {ours['steps']} steps, "
        f"BPE vocab {ours['vocab']}) | {ours['seconds']:.1f} s ({time_ratio:.2f}x) | {ours['bits_per_byte']:.3f} |",
        "",
        f"OpenLLM reaches nanoGPT's final {base['bits_per_byte']:.3f} bits/byte at {reach_text}, everything "
        "before included (validation every eighth of the run; the trainer's validation loss converted with VAL.txt's "
        "tokens per byte). Its curve: " + ", ".join(f"{t:.0f} s {bpb:.3f}" for t, _, bpb in ours["curve"]) + ".",
        "",
    ]
    record = "\n".join(lines)
    print(record)
    write_section(args.output, "Quality per CPU-second", record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
