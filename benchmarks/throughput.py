#!/usr/bin/env python3
"""Trainer overhead, checkpoint speed, resume time and memory, measured in one run.

    python benchmarks/throughput.py [--model-size tiny] [--steps 150] [--repeats 2] [--device cpu]

The OpenLLM trainer (validation, checkpoints, per-step logs and metrics all on) and a plain
hand-written PyTorch loop train the same model on the same data with the same settings,
alternately, so that drift on a shared machine hits both. The ratio of their tokens/s is the
trainer's overhead. Results are printed and written to docs/benchmarks.md (throughput section).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openllm import checkpoint as ck
from openllm.config import TrainConfig, model_config_for
from openllm.data import prepare_dataset
from openllm.launch import configure_optimizer, seed_everything, setup
from openllm.metrics import memory_mb
from openllm.model import GPT
from openllm.train import lr_at, train_loop

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def plain_loop(cfg: TrainConfig, tokens: np.ndarray, vocab: int, device: torch.device) -> float:
    """A plain PyTorch loop: random windows, AdamW, accumulation, clipping, one sync per step. Returns tokens/s."""
    seed_everything(cfg.seed)
    model = GPT(model_config_for(cfg.model_size, vocab_size=vocab, dropout=cfg.dropout)).to(device)
    opt = configure_optimizer(model, cfg, device)
    rng = np.random.default_rng(cfg.seed)
    T, B = cfg.seq_len, cfg.batch_size
    start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for _ in range(cfg.gradient_accumulation_steps):
            ix = rng.integers(0, len(tokens) - T - 1, B)
            block = torch.from_numpy(np.stack([tokens[i : i + T + 1] for i in ix]).astype(np.int64)).to(device)
            _, loss = model(block[:, :-1], block[:, 1:])
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    elapsed = time.perf_counter() - start
    return cfg.max_steps * cfg.gradient_accumulation_steps * B * T / elapsed


def trainer_loop(cfg: TrainConfig) -> tuple[float, float, object]:
    """Tokens/s of the whole trainer loop (validation, checkpoints, logs, final files), and the same
    without the validation forward passes (the trainer's machinery alone)."""
    run = setup(cfg, log=lambda _m: None)
    start = time.perf_counter()
    train_loop(run)
    elapsed = time.perf_counter() - start
    tokens = cfg.max_steps * run.global_batch * cfg.seq_len
    return tokens / elapsed, tokens / (elapsed - run.eval_seconds), run


def checkpoint_figures(run, work: Path) -> dict:
    ckpt = __import__("openllm.train", fromlist=["build_checkpoint"]).build_checkpoint(run)
    path = work / "bench.pt"
    t = time.perf_counter()
    ck.save_checkpoint(ckpt, path)
    save_s = time.perf_counter() - t
    size = path.stat().st_size
    t = time.perf_counter()
    loaded = ck.load_checkpoint(path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ck.verify_checkpoint(path, loaded)
    verify_s = time.perf_counter() - t
    return {"size_mb": size / 1e6, "save_s": save_s, "load_s": load_s, "verify_s": verify_s,
            "save_mb_s": size / 1e6 / save_s, "load_mb_s": size / 1e6 / load_s}


def theoretical_memory_mb(model: GPT, cfg: TrainConfig) -> dict:
    n = model.num_parameters()
    c = model.config
    B, T, C, L, H = cfg.batch_size, cfg.seq_len, c.n_embd, c.n_layer, c.n_head
    # fp32 activations kept for backward, per layer: ~ (34 B T C + 5 B H T^2) half-precision bytes
    # (Korthikanti et al. 2022) doubled for fp32, plus logits (B T V, fp32, twice for the softmax grad).
    acts = L * (34 * B * T * C + 5 * B * H * T * T) * 2 + 2 * B * T * c.vocab_size * 4
    return {"weights": n * 4 / 1e6, "gradients": n * 4 / 1e6, "adam": 2 * n * 4 / 1e6, "activations": acts / 1e6,
            "total": (4 * n * 4 + acts) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="openllm-bench-"))
    try:
        ds = prepare_dataset([CORPUS], work / "data", vocab_size=1024)
        tokens = np.asarray(ds.train)
        plain, ours, ours_e2e, run = [], [], [], None
        for r in range(args.repeats):
            cfg = TrainConfig(data=str(ds.path), output_dir=str(work / f"run{r}"), model_size=args.model_size,
                              max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                              eval_every=max(1, args.steps // 3), save_every=max(1, args.steps // 3), eval_batches=4,
                              log_every=10**9, device=args.device, keep_last=2).resolved()
            plain.append(plain_loop(cfg, tokens, ds.meta["vocab_size"], device))
            e2e, machinery, run = trainer_loop(cfg)
            ours.append(machinery)
            ours_e2e.append(e2e)
            print(f"repeat {r + 1}: plain loop {plain[-1]:,.0f} tok/s, openllm trainer {ours[-1]:,.0f} tok/s "
                  f"({e2e:,.0f} with validation)")
        ratio = statistics.median(o / q for o, q in zip(ours, plain))
        ratio_e2e = statistics.median(o / q for o, q in zip(ours_e2e, plain))
        cfg = run.cfg
        t = time.perf_counter()
        resumed = setup(TrainConfig(output_dir=str(run.run_dir), resume="auto", max_steps=cfg.max_steps + 1),
                        log=lambda _m: None)
        from openllm.train import train_step
        train_step(resumed)
        resume_s = time.perf_counter() - t
        figures = checkpoint_figures(run, work)
        mem = theoretical_memory_mb(run.raw_model, cfg)
        peak = memory_mb(device)
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps
        lines = [
            "## Trainer throughput (benchmarks/throughput.py)", "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}.",
            f"Settings: preset `{cfg.model_size}` ({run.raw_model.num_parameters():,} parameters), batch {cfg.batch_size} x "
            f"{cfg.seq_len} tokens x {cfg.gradient_accumulation_steps} accumulation ({tokens_per_step:,} tokens/step), "
            f"{cfg.max_steps} steps, {args.repeats} alternating repeats; the trainer validates and saves a checkpoint every "
            f"{cfg.eval_every} steps and logs every step (metrics.jsonl, training log).", "",
            "| measure | value |", "| --- | --- |",
            *[f"| plain PyTorch loop, repeat {i + 1} | {v:,.0f} tokens/s |" for i, v in enumerate(plain)],
            *[f"| openllm trainer, repeat {i + 1} (validation time excluded / included) | {v:,.0f} / {e:,.0f} tokens/s |"
              for i, (v, e) in enumerate(zip(ours, ours_e2e))],
            f"| **trainer / plain loop (median), checkpoints + logs + final files, validation excluded** | **{ratio:.3f}x** |",
            f"| trainer / plain loop (median), validation passes included | {ratio_e2e:.3f}x |",
            f"| checkpoint size | {figures['size_mb']:.1f} MB |",
            f"| checkpoint save (checksum + fsync + rename) | {figures['save_s']:.3f} s ({figures['save_mb_s']:.0f} MB/s) |",
            f"| checkpoint load (weights_only) | {figures['load_s']:.3f} s ({figures['load_mb_s']:.0f} MB/s) |",
            f"| checkpoint verify (checksum recomputed) | {figures['verify_s']:.3f} s |",
            f"| time to resume (find + verify + load + first step) | {resume_s:.2f} s |",
            f"| peak memory (process RSS, includes the Python/torch runtime) | {peak:,.0f} MB |",
            f"| theoretical need: weights {mem['weights']:.1f} + grads {mem['gradients']:.1f} + AdamW {mem['adam']:.1f} + "
            f"activations ~{mem['activations']:.1f} MB | {mem['total']:.1f} MB |", "",
        ]
        text = "\n".join(lines)
        print(text)
        out = Path(args.output)
        old = out.read_text() if out.is_file() else "# Benchmarks\n\n"
        start = old.find("## Trainer throughput")
        if start >= 0:
            end = old.find("\n## ", start + 1)
            old = old[:start] + (old[end + 1:] if end >= 0 else "")
        out.write_text(old.rstrip() + "\n\n" + text)
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
