"""How much the server's continuous batching buys under load: aggregate generated tokens/s, time to
first token (p50/p95) and per-request latency at 1, 4, 16 and 64 concurrent streaming requests,
against one-at-a-time serving of the same requests (the same server with ``max_batch=1``), in one run.

    python benchmarks/serve_load.py                      # a tiny model trained here, and a small-shape one
    python benchmarks/serve_load.py --tiny-run runs/x    # an existing tiny run instead of training one

Each server runs in its own process on 127.0.0.1 (loopback only), the load generator in this one; the requests are bounded (``--requests``
per level, ``--max-tokens`` each, greedy). The ``small``-shape model has random weights and the tiny
run's tokenizer (so its vocabulary is that tokenizer's, not the preset's 32,000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import server_process  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY:", "The", "O, ", "What light", "MENENIUS:"]


def serve_only(args) -> None:
    """The server process: the model named by --serve, with --max-batch rows, on --port."""
    import torch
    import uvicorn

    from openllm.inference.loading import LoadedModel, load_model
    from openllm.inference.server import ServerLimits, create_app
    from openllm.model import build_model
    from openllm.model.config import model_config_for

    loaded = load_model(args.tiny_run)
    if args.serve == "small":
        torch.manual_seed(0)
        small = build_model(model_config_for("small", vocab_size=loaded.tokenizer.vocab_size, dropout=0.0)).eval()
        loaded = LoadedModel(small, loaded.tokenizer, loaded.source)
    limits = ServerLimits(max_tokens=args.max_tokens, max_queue=128, max_batch=args.max_batch)
    uvicorn.run(create_app(loaded, args.serve, limits), host="127.0.0.1", port=args.port, log_level="warning")


@contextlib.contextmanager
def serving(name: str, tiny_run: str, max_batch: int, max_tokens: int):
    """A server in its own process (so the load generator does not share its interpreter); yields its URL."""
    args = ("--serve", name, "--tiny-run", tiny_run, "--max-batch", str(max_batch), "--max-tokens", str(max_tokens))
    with server_process(__file__, *args) as (url, _pid):
        yield url


async def one_request(client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens) of one streaming request."""
    t0 = time.perf_counter()
    first = None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    return (first if first is not None else latency), latency, tokens


async def load_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        queue = list(range(requests))
        results: list[tuple[float, float, int]] = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "latency_mean": statistics.mean(latency),
        "tokens": tokens,
    }


def measure(name: str, levels: list[int], args) -> list[dict]:
    rows = []
    for level in levels:
        requests = max(level, args.requests) if level > 1 else args.requests // 2
        figures = {}
        for mode, batch in (("batched", max(16, level)), ("one-at-a-time", 1)):
            with serving(name, args.tiny_run, batch, args.max_tokens) as url:
                asyncio.run(load_level(url, min(level, 2), 4, args.max_tokens))  # warm-up
                trials = [asyncio.run(load_level(url, level, requests, args.max_tokens)) for _ in range(args.trials)]
                figures[mode] = sorted(trials, key=lambda t: t["tokens_per_s"])[len(trials) // 2]  # the median
        b, s = figures["batched"], figures["one-at-a-time"]
        row = {"model": name, "concurrent": level, "requests": requests, **{f"batched_{k}": v for k, v in b.items()},
               **{f"single_{k}": v for k, v in s.items()}, "speedup": b["tokens_per_s"] / s["tokens_per_s"]}  # fmt: skip
        rows.append(row)
        print(
            f"{name:6s} {level:3d} concurrent: batched {b['tokens_per_s']:7.1f} tok/s (TTFT p50 {b['ttft_p50']:.3f} s, "
            f"p95 {b['ttft_p95']:.3f} s, latency {b['latency_mean']:.2f} s) | one-at-a-time {s['tokens_per_s']:7.1f} "
            f"tok/s (TTFT p50 {s['ttft_p50']:.3f} s, p95 {s['ttft_p95']:.3f} s, latency {s['latency_mean']:.2f} s) "
            f"| {row['speedup']:.2f}x",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-run", help="a trained tiny run directory (default: train one for 300 steps)")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrent requests, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (at least the level)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--trials", type=int, default=3, help="runs per level and mode (the median is reported)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one server process
    ap.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_only(args)
        return
    levels = [int(x) for x in args.levels.split(",")]

    import torch

    run = args.tiny_run
    if run is None:
        run = str(Path(tempfile.mkdtemp(prefix="serve-load-")) / "tiny")
        print(f"training a tiny model for 300 steps in {run} ...", flush=True)
        subprocess.run([sys.executable, "-m", "openllm", "train", "--max-steps", "300", "--output-dir", run,
                        "--sample-tokens", "0"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    args.tiny_run = run
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.max_tokens} tokens per request, greedy", flush=True)  # fmt: skip
    rows = measure("tiny", levels, args)
    if not args.skip_small:
        rows += measure("small", levels, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
