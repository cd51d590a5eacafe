#!/usr/bin/env python3
"""Per-process memory of FSDP (``--fsdp``) against DDP: the `small` shape trained on 2 CPU processes (gloo).

    python benchmarks/fsdp_memory.py                  # small (about a minute)
    python benchmarks/fsdp_memory.py --model-size tiny

Each way starts its two processes with torchrun and takes a few AdamW steps on random tokens with OpenLLM's own
model, sharding and optimizer; every process then reports the bytes it holds of parameters, gradients (as they
are after the backward pass) and optimizer moments, counted tensor by tensor (a shard counts its own slice),
and its peak resident memory. FSDP should hold about half of the first three on each of two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(size: str, fsdp: bool, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from openllm.model import build_model
    from openllm.model.config import model_config_for
    from openllm.training.config import OptimizerOptions
    from openllm.training.optim import configure_optimizer
    from openllm.training.sharding import gradient_sync, shard_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(model_config_for(size, vocab_size=32000, dropout=0.0))
    if fsdp:
        shard_model(model, torch.device("cpu"), torch.float32)
        trained = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    options = OptimizerOptions(optimizer="adamw", weight_decay=0.1, grad_clip=1.0, max_bad_steps=5)
    optimizer = configure_optimizer(model, options, 1e-4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        x = torch.randint(0, 32000, (2, 128), generator=gen)
        with gradient_sync(trained, True):
            _, loss = trained(x, x)
        loss.backward()
        grads = sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held = {
        "parameters": sum(_local_bytes(p) for p in model.parameters()),
        "gradients": grads,
        "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, held)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(every))
    dist.destroy_process_group()


def _local_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="small")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.model_size, a.worker == "fsdp", a.steps)
    results = {}
    for way in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", way, "--model-size", a.model_size, "--steps", str(a.steps)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            raise SystemExit(f"{way} failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")
        results[way] = json.loads(line[len("RESULT ") :])
    mb = 2**20
    print(f"{a.model_size}, 2 CPU processes (gloo), AdamW; per process (rank 0 / rank 1), MiB")
    print("| held by each process | DDP | FSDP | FSDP / DDP |")
    print("| --- | --- | --- | --- |")
    for key, label in (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "AdamW moments"),
                       ("peak_rss", "peak resident memory")):  # fmt: skip
        d = [r[key] / mb for r in results["ddp"]]
        f = [r[key] / mb for r in results["fsdp"]]
        ratio = sum(f) / sum(d) if sum(d) else float("nan")
        print(f"| {label} | {d[0]:,.1f} / {d[1]:,.1f} | {f[0]:,.1f} / {f[1]:,.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
