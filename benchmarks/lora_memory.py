#!/usr/bin/env python3
"""What LoRA saves against full fine-tuning: peak memory and step time of training steps of the `small` preset's
shape (GPT-2 layout, 6 x 512, vocabulary 32,000), the same batch every step, with AdamW (the trainer's
``configure_optimizer``) over every parameter or over the adapters only (``--lora-rank``, default targets q, v).

    python benchmarks/lora_memory.py [--steps 3] [--pairs 2] [--batch-size 8] [--seq-len 512] [--smoke]

Each trial runs in a fresh process, full and LoRA interleaved (the order alternating by pair) so that a shared
host's drift hits both. Peak memory is the process's resident high-water mark (``ru_maxrss``) less what it held
before the model was built, on the CPU; ``torch.cuda.max_memory_allocated`` with ``--device cuda``. Step time is
the median of the steps after the first (which allocates the optimizer state). The figures go to
docs/benchmarks.md (section "LoRA against full fine-tuning"), or only to the screen with ``--output -``.
``--smoke`` runs the `tiny` shape for a few steps: seconds, for the test that keeps the script working.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MODES = ("full", "lora")


def trial(args) -> dict:
    """One training run in this process: its peak memory and step times."""
    import torch

    from openllm.model import build_model
    from openllm.model.config import get_preset, model_config_for
    from openllm.model.lora import LoRAConfig, apply_lora
    from openllm.training.config import TrainConfig
    from openllm.training.optim import configure_optimizer

    device = torch.device(args.device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (Linux: KiB)
    torch.manual_seed(0)
    model = build_model(model_config_for(args.shape)).to(device).train()
    if args.trial == "lora":
        apply_lora(model, LoRAConfig(rank=args.rank))
    cfg = TrainConfig(model_size=args.shape, optimizer="adamw").resolved()
    optimizer = configure_optimizer(model, cfg.optimization, get_preset(args.shape).learning_rate, device)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_bytes": peak, "step_s": statistics.median(times[1:] or times), "trainable": trainable}


def run_trial(mode: str, args) -> dict:
    options = ["--shape", args.shape, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    options += ["--seq-len", str(args.seq_len), "--rank", str(args.rank), "--device", args.device]
    r = subprocess.run(
        [sys.executable, __file__, "--trial", mode, *options], capture_output=True, text=True, timeout=3600
    )
    if r.returncode != 0:
        raise SystemExit(f"the {mode} trial failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per trial (the first is not timed)")
    p.add_argument("--pairs", type=int, default=2, help="full/LoRA trial pairs, interleaved")
    p.add_argument("--batch-size", type=int, default=8, help="the small preset's 8")
    p.add_argument("--seq-len", type=int, default=512, help="the small preset's 512")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", default="small", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="the tiny shape, 2 steps of 2 x 32, one pair: seconds")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="'-': print only")
    p.add_argument("--trial", choices=MODES, help=argparse.SUPPRESS)  # (a child: one trial, its JSON printed)
    args = p.parse_args()
    if args.trial:
        print(json.dumps(trial(args)))
        return
    if args.smoke:
        args.shape, args.steps, args.pairs, args.batch_size, args.seq_len, args.rank = "tiny", 2, 1, 2, 32, 4
    import torch
    from report import processor, publish

    cpu = processor() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"processor: {cpu}", flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for pair in range(args.pairs):
        for mode in MODES if pair % 2 == 0 else MODES[::-1]:
            runs[mode].append(run_trial(mode, args))
            r = runs[mode][-1]
            print(
                f"pair {pair + 1}: {mode} {r['peak_bytes'] / 2**20:,.0f} MiB peak, {r['step_s']:.2f} s/step", flush=True
            )

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    memory = (
        "resident-memory high-water mark above the process before the model"
        if args.device == "cpu"
        else ("torch.cuda.max_memory_allocated")
    )
    from openllm.model.config import get_preset

    preset = get_preset(args.shape)
    mib = {m: median(m, "peak_bytes") / 2**20 for m in MODES}
    step = {m: median(m, "step_s") for m in MODES}
    command = "python benchmarks/lora_memory.py" + (" --smoke" if args.smoke else "")
    setting = f"--steps {args.steps} --pairs {args.pairs} --batch-size {args.batch_size} --seq-len {args.seq_len}"
    lines = [
        f"## LoRA against full fine-tuning: `{command} {setting}`",
        "",
        f"Machine: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}. "
        f"The `{args.shape}` preset's shape, batch {args.batch_size} x {args.seq_len} tokens (the same batch every "
        f"step), AdamW; LoRA rank {args.rank}, alpha 16, targets q, v. Each trial a fresh process, {args.pairs} "
        f"full/LoRA pairs interleaved; memory is the {memory}, step time the median after the first step.",
        "",
        "| measure | full fine-tuning | LoRA | LoRA / full |",
        "| --- | --- | --- | --- |",
        f"| trainable parameters | {runs['full'][0]['trainable']:,} | {runs['lora'][0]['trainable']:,} | "
        f"{runs['lora'][0]['trainable'] / runs['full'][0]['trainable']:.4f} |",
        f"| peak memory (median) | {mib['full']:,.0f} MiB | {mib['lora']:,.0f} MiB | {mib['lora'] / mib['full']:.3f} |",
        f"| step time (median) | {step['full']:.3f} s | {step['lora']:.3f} s | {step['lora'] / step['full']:.3f} |",
        *[
            f"| pair {i + 1} | {f['peak_bytes'] / 2**20:,.0f} MiB, {f['step_s']:.3f} s | "
            f"{lo['peak_bytes'] / 2**20:,.0f} MiB, {lo['step_s']:.3f} s | |"
            for i, (f, lo) in enumerate(zip(runs["full"], runs["lora"], strict=True))
        ],
        "",
        *(
            [
                f"This setting is shorter than the preset's own batch of {preset.batch_size} x {preset.seq_len} "
                "tokens (chosen to finish in minutes on this host); the memory the activations take grows with it.",
                "",
            ]
            if (args.batch_size, args.seq_len) != (preset.batch_size, preset.seq_len)
            else []
        ),
        "LoRA keeps no gradient or AdamW moments for the frozen base (12 bytes per base parameter in float32); "
        "the activations, the logits over the vocabulary above all, are the same in both, and the backward pass "
        "still runs through every layer, so step time gains only the weight gradients and the optimizer step.",
        "",
    ]
    if args.output == "-":
        print("\n".join(lines))
    else:
        publish(args.output, "LoRA against full fine-tuning", lines)


if __name__ == "__main__":
    main()
