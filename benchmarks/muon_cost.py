#!/usr/bin/env python3
"""What Muon costs against AdamW on this processor: the `tiny` preset's plain PyTorch loop (the trainer's model,
data and optimizer, nothing else) with each optimizer, interleaved so that a shared host's drift hits both.

    python benchmarks/muon_cost.py [--steps 120] [--pairs 4] [--as-avx2]

Prints the tokens/s of every run and the median Muon / AdamW ratio of the pairs, and the time of one
optimizer step of each; writes them to docs/benchmarks.md (section "Muon against AdamW").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import add_cpu_kind_option, apply_cpu_kind, processor, publish  # noqa: E402
from throughput import CORPUS, plain_loop  # noqa: E402

from openllm.data.prepare import prepare_dataset  # noqa: E402
from openllm.model import build_model  # noqa: E402
from openllm.model.config import model_config_for  # noqa: E402
from openllm.training.config import TrainConfig  # noqa: E402
from openllm.training.optim import configure_optimizer  # noqa: E402

OPTIMIZERS = ("muon", "adamw")


def optimizer_step_ms(name: str, vocab: int, repeats: int = 30) -> float:
    model = build_model(model_config_for("tiny", vocab_size=vocab))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    cfg = TrainConfig(optimizer=name).resolved()
    opt = configure_optimizer(model, cfg.optimization, cfg.learning_rate, torch.device("cpu"))
    for _ in range(3):
        opt.step()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    add_cpu_kind_option(p)
    args = p.parse_args()
    apply_cpu_kind(args)
    cpu = processor()
    print(f"processor: {cpu}", flush=True)
    with tempfile.TemporaryDirectory(prefix="openllm-muon-") as tmp:
        ds = prepare_dataset([CORPUS], Path(tmp) / "data", vocab_size=1024)
        tokens, vocab = np.asarray(ds.train), ds.meta["vocab_size"]
        runs: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
        for pair in range(args.pairs):
            for name in OPTIMIZERS if pair % 2 == 0 else OPTIMIZERS[::-1]:
                cfg = TrainConfig(
                    data=str(ds.path), output_dir=tmp, model_size="tiny", max_steps=args.steps, optimizer=name
                ).resolved()
                runs[name].append(plain_loop(cfg, tokens, vocab, torch.device("cpu"))["wall"])
                print(f"pair {pair + 1}: {name} {runs[name][-1]:,.0f} tokens/s", flush=True)
    ratios = [m / a for m, a in zip(runs["muon"], runs["adamw"], strict=True)]
    step_ms = {name: optimizer_step_ms(name, vocab) for name in OPTIMIZERS}
    kind = "as an AVX2-only CPU" if args.as_avx2 else "own kernels"
    lines = [
        f"## Muon against AdamW ({kind}): `python benchmarks/muon_cost.py{' --as-avx2' if args.as_avx2 else ''}`",
        "",
        f"Machine: {cpu}; {torch.get_num_threads()} torch threads, torch {torch.__version__}. The `tiny` preset's "
        f"plain loop ({args.steps} steps of 16 x 128 tokens), Muon and AdamW runs interleaved, {args.pairs} pairs.",
        "",
        "| measure | Muon | AdamW |",
        "| --- | --- | --- |",
        *[
            f"| pair {i + 1}, tokens/s | {m:,.0f} | {a:,.0f} |"
            for i, (m, a) in enumerate(zip(runs["muon"], runs["adamw"], strict=True))
        ],
        f"| one optimizer step (all parameters) | {step_ms['muon']:.1f} ms | {step_ms['adamw']:.1f} ms |",
        f"| **Muon / AdamW tokens/s, median of the pairs** | **{statistics.median(ratios):.3f}x** "
        f"({', '.join(f'{r:.3f}' for r in ratios)}) | |",
        "",
    ]
    publish(args.output, f"Muon against AdamW ({kind})", lines)


if __name__ == "__main__":
    main()
