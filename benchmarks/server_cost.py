#!/usr/bin/env python3
"""The server's own cost: the inference engine alone against the server streaming to concurrent clients,
the same model, prompts and lengths, in one run.

    python benchmarks/server_cost.py [--tiny-run RUN] [--concurrent 16] [--requests 128] [--max-tokens 48]
                                     [--client lean|httpx] [--stream-interval S] [--threads N]

"engine": the requests submitted at once to an :class:`openllm.inference.engine.Engine` of ``--concurrent``
rows in this process. "server": the same requests as streamed completions, ``--concurrent`` at a time (each
client sends its next request when its answer is complete), to ``openllm serve``'s app (``max_batch`` =
``--concurrent``) in a process of its own on 127.0.0.1, the clients in this one: by default a minimal
HTTP/1.1 client on asyncio streams, so that on a small machine the load generator takes little of the CPU
the server needs (``--client httpx``: serve_load.py's). Both generate exactly ``--max-tokens`` greedy tokens
per request (the end-of-text token is switched off). The model is the ``tiny`` shape with random weights and
a tokenizer prepared here from the bundled Shakespeare, or the run named by ``--tiny-run``. Trials alternate
between the two, so that drift on a shared machine hits both; the ratio reported is the median of the
trials' ratios. Results are printed and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import processor, publish, server_process  # noqa: E402
from serve_load import PROMPTS, load_level  # noqa: E402


def loaded_model(tiny_run: str | None, tokenizer_dir: str):
    """The model and tokenizer both parts use, the end-of-text token switched off."""
    import torch

    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel, load_model
    from openllm.model import build_model
    from openllm.model.config import model_config_for

    if tiny_run:
        loaded = load_model(tiny_run)
    else:
        tok = load_tokenizer(tokenizer_dir)
        torch.manual_seed(0)
        model = build_model(model_config_for("tiny", vocab_size=tok.vocab_size, dropout=0.0)).eval()
        loaded = LoadedModel(model, tok, Path(tokenizer_dir))
    loaded.tokenizer.special = dataclasses.replace(loaded.tokenizer.special, eos=None)
    return loaded


def serve_only(args) -> None:
    """The server process (internal --serve mode)."""
    import uvicorn

    from openllm.inference.server import ServerLimits, create_app

    loaded = loaded_model(args.tiny_run, args.tokenizer)
    limits = ServerLimits(max_tokens=args.max_tokens, max_queue=max(64, args.requests), max_batch=args.concurrent)
    if args.stream_interval is not None:
        limits.stream_interval = args.stream_interval
    uvicorn.run(create_app(loaded, "tiny", limits), host="127.0.0.1", port=args.port, log_level="warning")


def serving(args):
    """The server process; yields (its URL, its pid)."""
    cmd = ["--serve", "--tokenizer", args.tokenizer, "--concurrent", str(args.concurrent),
           "--max-tokens", str(args.max_tokens), "--requests", str(args.requests)]  # fmt: skip
    if args.tiny_run:
        cmd += ["--tiny-run", args.tiny_run]
    if args.stream_interval is not None:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return server_process(__file__, *cmd)


async def lean_request(reader, writer, body: bytes) -> int:
    """One streamed completion over a kept-alive connection, read with as little work as the protocol allows
    (chunked transfer coding, server-sent events); returns the generated tokens its usage chunk counts."""
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    last = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        if b'"usage"' in data:
            last = next(e for e in data.split(b"\n\n") if b'"usage"' in e)
    return json.loads(last[len(b"data: ") :])["usage"]["completion_tokens"]


async def lean_load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """``requests`` streamed completions (serve_load's prompts), ``concurrency`` at a time, each client on its
    own connection; the generated tokens per second."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    queue = list(range(requests))
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        reader, writer = await asyncio.open_connection(host, int(port))
        while queue:
            i = queue.pop()
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            got = await lean_request(reader, writer, json.dumps(body).encode())
            tokens += got  # (not `tokens += await ...`: that reads tokens before the others add theirs)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return {"tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - t0)}


def engine_alone(engine, loaded, requests: int, max_tokens: int) -> float:
    """Generated tokens/s of ``requests`` greedy sequences submitted at once to ``engine``."""
    from openllm.inference.sampling import SamplingOptions

    opts = SamplingOptions(max_new_tokens=max_tokens, temperature=0)
    prompts = [loaded.tokenizer.prompt_ids(PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    t0 = time.perf_counter()
    streams = [engine.submit(ids, opts) for ids in prompts]
    tokens = sum(1 for stream in streams for _ in stream)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-run", help="a trained run directory (default: the tiny shape, random weights)")
    ap.add_argument("--concurrent", type=int, default=16, help="streaming clients, and the engine's rows")
    ap.add_argument("--requests", type=int, default=128, help="requests per trial")
    ap.add_argument("--threads", type=int, help="torch threads in both processes (default: torch's default)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    ap.add_argument("--trials", type=int, default=5, help="trials of each")
    ap.add_argument("--client", choices=("lean", "httpx"), default="lean",
                    help="the load generator: a minimal HTTP/1.1 client on asyncio streams, or httpx (serve_load.py's)")  # fmt: skip
    ap.add_argument("--stream-interval", type=float, help="the server's --stream-interval (default: its default)")
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"), help="'-': print only")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: the server process
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.serve:
        serve_only(args)
        return

    import psutil
    import torch

    from openllm.data.prepare import prepare_dataset
    from openllm.inference.engine import Engine

    if args.tiny_run is None:
        work = Path(tempfile.mkdtemp(prefix="server-cost-"))
        corpus = work / "corpus.txt"
        corpus.write_text((ROOT / "src/openllm/corpus/tinyshakespeare.txt").read_text()[:300_000])
        args.tokenizer = str(prepare_dataset([corpus], work / "data", vocab_size=1024).path)
    loaded = loaded_model(args.tiny_run, args.tokenizer)
    engine = Engine(loaded.model, args.concurrent)
    engine_alone(engine, loaded, args.concurrent, 4)  # warm-up
    load = lean_load if args.client == "lean" else load_level
    rates: dict[str, list[float]] = {"engine": [], "server": []}
    cpu: dict[str, list[float]] = {"engine": [], "server": [], "loop": []}  # CPU seconds per generated token
    tokens = args.requests * args.max_tokens
    with serving(args) as (url, pid):
        server_process = psutil.Process(pid)

        def server_cpu() -> tuple[float, float]:
            threads = {t.id: t.user_time + t.system_time for t in server_process.threads()}
            return sum(threads.values()), threads[pid]  # (the whole process, its main thread: the event loop)

        asyncio.run(load(url, 2, 4, 4))  # warm-up
        for _ in range(args.trials):
            start = time.process_time()
            rates["engine"].append(engine_alone(engine, loaded, args.requests, args.max_tokens))
            cpu["engine"].append((time.process_time() - start) / tokens)
            before = server_cpu()
            server = asyncio.run(load(url, args.concurrent, args.requests, args.max_tokens))
            after = server_cpu()
            assert server["tokens"] == tokens, server
            rates["server"].append(server["tokens_per_s"])
            cpu["server"].append((after[0] - before[0]) / tokens)
            cpu["loop"].append((after[1] - before[1]) / tokens)
            e, v = rates["engine"][-1], rates["server"][-1]
            print(
                f"engine {e:8.1f} tokens/s | server {v:8.1f} tokens/s | {v / e:.2f}x | CPU per token: engine "
                f"{1e6 * cpu['engine'][-1]:.0f} us, server {1e6 * cpu['server'][-1]:.0f} us "
                f"(event loop {1e6 * cpu['loop'][-1]:.0f} us)",
                flush=True,
            )
    ratio = statistics.median(v / e for e, v in zip(rates["engine"], rates["server"], strict=True))
    from openllm.inference.security import ServerLimits

    interval = ServerLimits.stream_interval if args.stream_interval is None else args.stream_interval
    lines = [
        f"## The server's own cost: `python benchmarks/server_cost.py{' --tiny-run RUN' if args.tiny_run else ''}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {processor()}. The `tiny` shape "
        f"({'a trained run' if args.tiny_run else 'random weights'}, vocabulary {loaded.tokenizer.vocab_size:,}); "
        f"{args.requests} requests of {args.max_tokens} greedy tokens, {args.concurrent} at a time "
        f"(`--stream-interval {interval:g}`, {args.client} client); {args.trials} alternating trials. Engine: "
        "the requests submitted straight to the inference engine in one process; server: streamed over HTTP "
        "from a server process to clients in another.",
        "",
        "| | tokens/s (median) | trials |",
        "| --- | --- | --- |",
        *[f"| {k} | {statistics.median(v):,.1f} | {', '.join(f'{x:,.0f}' for x in v)} |" for k, v in rates.items()],
        "",
        f"Server / engine (the median of the trials' ratios): **{ratio:.2f}x** (target: at least 0.80x at 16 "
        "concurrent streams).",
        "",
        "CPU time per generated token (medians), which a busy machine disturbs less than the rates: the engine "
        f"alone {1e6 * statistics.median(cpu['engine']):.0f} us; the server process "
        f"{1e6 * statistics.median(cpu['server']):.0f} us, of which its event loop (HTTP, streaming, "
        f"detokenizing) {1e6 * statistics.median(cpu['loop']):.0f} us; engine / server "
        f"{statistics.median(cpu['engine']) / statistics.median(cpu['server']):.2f}x. Load average during the "
        f"run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
    ]
    if args.output == "-":
        print("\n".join(lines))
    else:
        publish(args.output, "The server's own cost", lines)


if __name__ == "__main__":
    main()
