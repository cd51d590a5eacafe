#!/usr/bin/env python3
"""Quality per CPU-second of the `tiny` preset against nanoGPT's CPU recipe, side by side.

    python benchmarks/tiny_quality.py [--skip-baseline] [--no-curve] [--as-avx2] [-- OPENLLM TRAIN OPTIONS]

The processor and the kernels PyTorch really uses are printed first; `--as-avx2` runs everything (both
runs, every process) as an AVX2-only CPU would, so one AVX-512/AMX machine measures both kinds.

Split: tiny Shakespeare, first 90% of the characters for training (TRAIN.txt), last 10% for
validation (VAL.txt), as nanoGPT's shakespeare_char preparation does.

Baseline: nanoGPT's documented CPU configuration (4 layers, 4 heads, 128 wide, context 64, batch
12, 2000 iterations, dropout 0, character vocabulary, lr 1e-3 -> 1e-4 with 100 warmup steps,
AdamW betas (0.9, 0.99), weight decay 0.1, no bias, an estimate of 20 batches of each split every
250 steps with a checkpoint when it improves), written here as a plain PyTorch loop on this
project's GPT model and run in its own process: its wall time counts everything from the process's
start to the end of training (start-up, imports, preparation of the character data, training,
checkpoints), as `python train.py` would. Its validation loss is then measured (not timed) on all of
VAL.txt with disjoint 64-character windows.

OpenLLM: `openllm train --data-file TRAIN.txt --validation-data VAL.txt --model-size tiny
--device cpu` with the preset's defaults, then `openllm eval --json --stride SEQ_LEN` on VAL.txt
(disjoint windows, as the trainer's validation and the baseline's); the wall time covers both commands
(preparation, tokenizer training, training, evaluation, process start-up). A second, identical run
validates every eighth of the run (skip it with --no-curve): the time it needs to reach nanoGPT's final
validation loss is read from its validation lines as they are printed (wall time since its start,
everything before included, its extra validations too), each converted to bits per byte with the
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
from report import add_cpu_kind_option, apply_cpu_kind, processor, write_section  # noqa: E402

CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def nanogpt_cpu_baseline(train_file: Path, val_file: Path, work: Path) -> None:
    """The baseline's whole run, in this (child) process; prints a JSON line with the wall-clock time its
    training ended and its validation loss on all of VAL.txt (measured after that time)."""
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    train_text, val_text = train_file.read_text(encoding="utf-8"), val_file.read_text(encoding="utf-8")
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

    best = math.inf
    for it in range(iters + 1):
        if it % 250 == 0:  # nanoGPT's periodic estimate (20 batches of each split), checkpoint when it improves
            model.eval()
            with torch.no_grad():
                losses = {id(data): [model(*get_batch(data))[1].item() for _ in range(20)] for data in (train, val)}
            model.train()
            estimate = sum(losses[id(val)]) / 20
            if it > 0 and estimate < best:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it}, work / "ckpt.pt")
            best = min(best, estimate)
        if it == iters:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        _, loss = model(*get_batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    trained_at = time.time()
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
    print(json.dumps({"trained_at": trained_at, "val_loss_per_char": total / count}))


def run_baseline(train_file: Path, val_file: Path, work: Path) -> dict:
    launched = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--nanogpt-child", str(train_file), str(val_file), str(work)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    loss = result["val_loss_per_char"]
    return {"seconds": result["trained_at"] - launched, "val_loss_per_char": loss, "bits_per_byte": loss / math.log(2)}


def openllm_run(train_file: Path, val_file: Path, run_dir: Path, extra: list[str], curve: bool) -> dict:
    """`openllm train` then `openllm eval`, timed together; with ``curve``, validation every eighth of the run
    and the validation lines' times."""
    exe = [sys.executable, "-m", "openllm"]
    start = time.perf_counter()
    from openllm.model.config import get_preset

    steps = get_preset("tiny").max_steps
    for i, arg in enumerate(extra):
        if arg == "--max-steps":
            steps = int(extra[i + 1])
    every = ["--eval-every", str(max(1, steps // 8))] if curve else []
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
            *every,
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    points = []  # (seconds since the start, step, validation loss per token) as the trainer reports them
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"step (\d+): validation loss ([0-9.]+)", line)
        if m:
            points.append((time.perf_counter() - start, int(m.group(1)), float(m.group(2))))
    if proc.wait() != 0:
        raise SystemExit(f"openllm train failed (exit {proc.returncode})")
    cfg = json.loads((run_dir / "training_config.json").read_text())
    model_cfg = json.loads((run_dir / "config.json").read_text())
    out = subprocess.run(
        [*exe, "eval", "--model", str(run_dir), "--data", str(val_file), "--json", "--stride", str(cfg["seq_len"])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    seconds = time.perf_counter() - start
    result = json.loads(out)
    per_token = result["tokens"] / result["bytes"] / math.log(2)  # nats per token -> bits per byte
    return {
        "seconds": seconds,
        "curve": [(t, step, loss * per_token) for t, step, loss in points],
        "bits_per_byte": result["bits_per_byte"],
        "bytes": result["bytes"],
        "steps": cfg["max_steps"],
        "arch": model_cfg.get("arch", "gpt2"),
        "optimizer": cfg.get("optimizer", "adamw"),
        "vocab": model_cfg["vocab_size"],
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--nanogpt-child":
        nanogpt_cpu_baseline(*map(Path, sys.argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-baseline", action="store_true", help="only run openllm (for tuning; nothing recorded)")
    p.add_argument("--no-curve", action="store_true", help="skip the second run that validates every eighth")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    add_cpu_kind_option(p)
    p.add_argument("extra", nargs="*", help="extra `openllm train` options (tuning only; the record uses none)")
    args = p.parse_args()
    apply_cpu_kind(args)
    cpu = processor()
    print(f"processor: {cpu}", flush=True)
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory(prefix="openllm-quality-") as tmp:
        work = Path(tmp)
        train_file, val_file = work / "TRAIN.txt", work / "VAL.txt"
        train_file.write_text(text[:cut], encoding="utf-8")
        val_file.write_text(text[cut:], encoding="utf-8")
        ours = openllm_run(train_file, val_file, work / "run", args.extra, curve=False)
        print(
            f"openllm tiny: {ours['bits_per_byte']:.3f} bits/byte in {ours['seconds']:.1f} s wall "
            f"({ours['arch']}, {ours['optimizer']}, {ours['steps']} steps, vocab {ours['vocab']})",
            flush=True,
        )
        curve = None
        if not args.no_curve:
            curve = openllm_run(train_file, val_file, work / "curve-run", args.extra, curve=True)
            print(
                f"with validation every eighth: {curve['seconds']:.1f} s; curve "
                + ", ".join(f"{t:.0f}s:{bpb:.3f}" for t, _, bpb in curve["curve"]),
                flush=True,
            )
        if args.skip_baseline:
            return
        base = run_baseline(train_file, val_file, work)
        print(
            f"nanoGPT CPU recipe: {base['bits_per_byte']:.3f} bits/byte (loss {base['val_loss_per_char']:.3f} "
            f"nats/char) in {base['seconds']:.1f} s"
        )
    time_ratio = ours["seconds"] / base["seconds"]
    heading = f"Quality per CPU-second ({'as an AVX2-only CPU' if args.as_avx2 else 'own kernels'})"
    lines = [
        f"## {heading}: `tiny` against nanoGPT's CPU recipe (`python benchmarks/tiny_quality.py"
        f"{' --as-avx2' if args.as_avx2 else ''}`)",
        "",
        f"Machine: {cpu}; {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. Tiny Shakespeare, first 90% of the characters for training, last 10% "
        f"({ours['bytes']:,} bytes) for validation; both measured in the same run, each everything included.",
        "",
        "| run | wall time | validation bits/byte |",
        "| --- | --- | --- |",
        f"| nanoGPT CPU recipe (char-level, 2000 iterations; process start to end of training) | "
        f"{base['seconds']:.1f} s | {base['bits_per_byte']:.3f} (loss {base['val_loss_per_char']:.3f} nats/char) |",
        f"| `openllm train ... --model-size tiny` + `openllm eval` ({ours['arch']}, {ours['optimizer']}, "
        f"{ours['steps']} steps, BPE vocab {ours['vocab']}) | {ours['seconds']:.1f} s ({time_ratio:.2f}x) | "
        f"{ours['bits_per_byte']:.3f} |",
        "",
    ]
    if curve is not None:
        reached = next(((t, step) for t, step, bpb in curve["curve"] if bpb <= base["bits_per_byte"]), None)
        reach_text = (
            f"{reached[0]:.1f} s ({reached[0] / base['seconds']:.2f}x nanoGPT's time; step {reached[1]})"
            if reached
            else "not reached"
        )
        print(f"openllm reaches nanoGPT's final {base['bits_per_byte']:.3f} bits/byte at {reach_text}")
        lines += [
            f"OpenLLM reaches nanoGPT's final {base['bits_per_byte']:.3f} bits/byte at {reach_text}, everything "
            "before included (a second run validating every eighth of the run, those validations included; the "
            "trainer's validation loss converted with VAL.txt's tokens per byte). Its curve: "
            + ", ".join(f"{t:.0f} s {bpb:.3f}" for t, _, bpb in curve["curve"])
            + ".",
            "",
        ]
    record = "\n".join(lines)
    print(record)
    write_section(args.output, heading, record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
