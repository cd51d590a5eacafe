#!/usr/bin/env python3
"""Trainer overhead, checkpoint speed, resume time and memory, measured in one run.

    python benchmarks/throughput.py [--model-size tiny] [--steps 150] [--repeats 2] [--device cpu]
                                    [--optimizer adamw|muon] [--as-avx2]

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openllm.checkpoint import format as ck
from openllm.core.device import resolve_dtype
from openllm.data.prepare import prepare_dataset
from openllm.model import LanguageModel, build_model
from openllm.model.config import get_preset, model_config_for
from openllm.training.config import TrainConfig
from openllm.training.loop import lr_at, train_loop
from openllm.training.metrics import memory_mb
from openllm.training.optim import configure_optimizer, seed_everything
from openllm.training.setup import setup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import add_cpu_kind_option, apply_cpu_kind, processor, publish  # noqa: E402

CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"


def plain_loop(
    cfg: TrainConfig, tokens: np.ndarray, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> dict:
    """A plain PyTorch loop: random windows, the run's optimizer, accumulation, clipping, autocast in ``dtype``, one sync
    per step. Returns tokens per wall-clock second and per CPU second."""
    seed_everything(cfg.seed)
    model = build_model(model_config_for(cfg.model_size, vocab_size=vocab, arch=cfg.arch, dropout=cfg.dropout)).to(
        device
    )
    opt = configure_optimizer(model, cfg.optimization, cfg.learning_rate, device)
    rng = np.random.default_rng(cfg.seed)
    T, B = cfg.seq_len, cfg.batch_size
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, cfg.max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for _ in range(cfg.gradient_accumulation_steps):
            ix = rng.integers(0, len(tokens) - T - 1, B)
            block = torch.from_numpy(np.stack([tokens[i : i + T + 1] for i in ix]).astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(block[:, :-1], block[:, 1:])
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = cfg.max_steps * cfg.gradient_accumulation_steps * B * T
    return {"wall": tokens / elapsed, "cpu": tokens / cpu}


def trainer_loop(cfg: TrainConfig) -> tuple[dict, object]:
    """Tokens/s of the trainer: steady state (steps, per-step logs, periodic checkpoints), plus the one-off
    end-of-run files (final checkpoint, model card, plot), plus the validation passes."""
    import openllm.training.loop as T

    run = setup(cfg, log=lambda _m: None)
    real_finish, spent = T.finish, {}

    def timed_finish(r, *rest):
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_finish(r, *rest)
        finally:
            spent["finish"], spent["finish_cpu"] = time.perf_counter() - t, time.process_time() - c

    T.finish = timed_finish
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        train_loop(run)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        T.finish = real_finish
    tokens = cfg.max_steps * run.global_batch * cfg.seq_len
    steady = elapsed - run.eval_seconds - spent["finish"]
    steady_cpu = cpu - run.eval_cpu_seconds - spent["finish_cpu"]
    return {
        "steady": tokens / steady,
        "with_final_files": tokens / (steady + spent["finish"]),
        "everything": tokens / elapsed,
        "steady_cpu": tokens / steady_cpu,
        "everything_cpu": tokens / cpu,
        "finish_s": spent["finish"],
        "eval_s": run.eval_seconds,
    }, run


def checkpoint_figures(run, work: Path) -> dict:
    ckpt = __import__("openllm.training.records", fromlist=["build_checkpoint"]).build_checkpoint(run)
    path = work / "bench.pt"
    t = time.perf_counter()
    ck.save_checkpoint(ckpt, path)
    save_s = time.perf_counter() - t
    size = path.stat().st_size
    t = time.perf_counter()
    loaded = ck.load_checkpoint(path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    assert loaded and ck.verify_checkpoint(path).ok
    verify_s = time.perf_counter() - t
    return {
        "size_mb": size / 1e6,
        "save_s": save_s,
        "load_s": load_s,
        "verify_s": verify_s,
        "save_mb_s": size / 1e6 / save_s,
        "load_mb_s": size / 1e6 / load_s,
    }


def theoretical_memory_mb(model: LanguageModel, cfg: TrainConfig) -> dict:
    n = model.num_parameters()
    # AdamW keeps two moments per parameter; Muon one momentum for the blocks' matrices it takes
    muon = sum(p.numel() for k, p in model.named_parameters() if k.startswith(model.BLOCKS) and p.dim() == 2)
    moments = 2 * n - (muon if cfg.optimizer == "muon" else 0)
    c = model.config
    B, T, C, L, H = cfg.batch_size, cfg.seq_len, c.n_embd, c.n_layer, c.n_head
    # fp32 activations kept for backward, per layer: ~ (34 B T C + 5 B H T^2) half-precision bytes
    # (Korthikanti et al. 2022) doubled for fp32, plus logits (B T V, fp32, twice for the softmax grad).
    acts = L * (34 * B * T * C + 5 * B * H * T * T) * 2 + 2 * B * T * c.vocab_size * 4
    return {
        "weights": n * 4 / 1e6,
        "gradients": n * 4 / 1e6,
        "optimizer": moments * 4 / 1e6,
        "activations": acts / 1e6,
        "total": ((2 * n + moments) * 4 + acts) / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizer", default=None, help="adamw or muon (default: the preset's)")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    add_cpu_kind_option(p)
    args = p.parse_args()
    apply_cpu_kind(args)
    cpu = processor() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"processor: {cpu}", flush=True)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="openllm-bench-"))
    try:
        ds = prepare_dataset([CORPUS], work / "data", vocab_size=1024)
        tokens = np.asarray(ds.train)
        plain, ours, run = [], [], None
        for r in range(args.repeats):
            cfg = TrainConfig(
                data=str(ds.path),
                output_dir=str(work / f"run{r}"),
                model_size=args.model_size,
                max_steps=args.steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                eval_every=max(1, args.steps // 3),
                save_every=max(1, args.steps // 3),
                eval_batches=4,
                log_every=10**9,
                device=args.device,
                optimizer=args.optimizer,
                keep_last=2,
            ).resolved()
            dtype = resolve_dtype(cfg.dtype, device, get_preset(cfg.model_size).cpu_dtype)  # as the trainer does
            if r % 2:  # alternate which loop goes first, so a slow phase of the host hits both alike
                figures_run, run = trainer_loop(cfg)
                plain.append(plain_loop(cfg, tokens, ds.meta["vocab_size"], device, dtype))
            else:
                plain.append(plain_loop(cfg, tokens, ds.meta["vocab_size"], device, dtype))
                figures_run, run = trainer_loop(cfg)
            ours.append(figures_run)
            print(
                f"repeat {r + 1}: plain loop {plain[-1]['wall']:,.0f} tok/s, openllm trainer {figures_run['steady']:,.0f} "
                f"tok/s steady, {figures_run['everything']:,.0f} with end-of-run files and validation"
            )
        ratio = {
            k: statistics.median(o[k] / q["wall"] for o, q in zip(ours, plain, strict=False))
            for k in ("steady", "with_final_files", "everything")
        }
        ratio.update(
            {
                k: statistics.median(o[k] / q["cpu"] for o, q in zip(ours, plain, strict=False))
                for k in ("steady_cpu", "everything_cpu")
            }
        )
        cfg = run.cfg
        t = time.perf_counter()
        resumed = setup(
            TrainConfig(output_dir=str(run.run_dir), resume="auto", max_steps=cfg.max_steps + 1), log=lambda _m: None
        )
        from openllm.training.loop import train_step

        train_step(resumed)
        resume_s = time.perf_counter() - t
        figures = checkpoint_figures(run, work)
        mem = theoretical_memory_mb(run.raw_model, cfg)
        peak = memory_mb(device)
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps
        kind = f" ({cfg.optimizer}, {'as an AVX2-only CPU' if args.as_avx2 else 'own kernels'})"
        flags = f" --optimizer {cfg.optimizer}" + (" --as-avx2" if args.as_avx2 else "")
        lines = [
            f"## Trainer throughput{kind}: `python benchmarks/throughput.py{flags}`",
            "",
            f"Machine: {cpu}; {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
            f"torch {torch.__version__}, Python {platform.python_version()}.",
            f"Settings: preset `{cfg.model_size}` ({run.raw_model.num_parameters():,} parameters), batch {cfg.batch_size} x "
            f"{cfg.seq_len} tokens x {cfg.gradient_accumulation_steps} accumulation ({tokens_per_step:,} tokens/step), "
            f"{cfg.max_steps} steps, autocast {str(run.autocast_dtype).replace('torch.', '')} in both loops, "
            f"{args.repeats} repeats alternating which loop runs first; the trainer validates and saves a checkpoint every "
            f"{cfg.eval_every} steps and logs every step (metrics.jsonl, training log).",
            "",
            "| measure | value |",
            "| --- | --- |",
            *[
                f"| plain PyTorch loop, repeat {i + 1} | {v['wall']:,.0f} tokens/s ({v['cpu']:,.0f} per CPU-second) |"
                for i, v in enumerate(plain)
            ],
            *[
                f"| openllm trainer, repeat {i + 1}: steady / with end-of-run files / with validation too | "
                f"{o['steady']:,.0f} / {o['with_final_files']:,.0f} / {o['everything']:,.0f} tokens/s |"
                for i, o in enumerate(ours)
            ],
            f"| **trainer / plain loop (median), steady state: per-step logs and metrics, periodic checkpoints** | "
            f"**{ratio['steady']:.3f}x** |",
            f"| **trainer / plain loop (median), per CPU-second (process time; on this shared host it drifts with wall time): steady state / "
            f"everything included** | **{ratio['steady_cpu']:.3f}x / {ratio['everything_cpu']:.3f}x** |",
            f"| trainer / plain loop, including the one-off end-of-run files (final checkpoint, model card, plot: "
            f"{statistics.median(o['finish_s'] for o in ours):.2f} s per run) | {ratio['with_final_files']:.3f}x |",
            f"| trainer / plain loop, including validation passes too ({statistics.median(o['eval_s'] for o in ours):.2f} s "
            f"per run) | {ratio['everything']:.3f}x |",
            f"| checkpoint size | {figures['size_mb']:.1f} MB |",
            f"| checkpoint save (checksum + fsync + rename) | {figures['save_s']:.3f} s ({figures['save_mb_s']:.0f} MB/s) |",
            f"| checkpoint load (weights_only, checksum verified) | {figures['load_s']:.3f} s ({figures['load_mb_s']:.0f} MB/s) |",
            f"| checkpoint verify (load, checksum, keys and shapes) | {figures['verify_s']:.3f} s |",
            f"| time to resume (find + verify + load + first step) | {resume_s:.2f} s |",
            f"| peak memory (process RSS, includes the Python/torch runtime) | {peak:,.0f} MB |",
            f"| theoretical need: weights {mem['weights']:.1f} + grads {mem['gradients']:.1f} + optimizer {mem['optimizer']:.1f} + "
            f"activations ~{mem['activations']:.1f} MB | {mem['total']:.1f} MB |",
            "",
        ]
        publish(args.output, f"Trainer throughput{kind}", lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
