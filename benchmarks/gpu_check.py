#!/usr/bin/env python3
"""Every GPU code path of OpenLLM in one command, with figures: run it the day a GPU is lent.

    python benchmarks/gpu_check.py            # on one CUDA GPU (bf16), a few minutes; --write records it
    python benchmarks/gpu_check.py --smoke    # no GPU: the same paths on the CPU with tiny sizes (CI runs this)

Checks, each reported as ok / FAILED with its figures (the exit status is 1 if any failed):

1. training tokens/s, MFU and peak memory for the `small` preset and the `medium` preset (111M parameters,
   the GPT-2 124M class), with and without `--compile`, with AdamW (fused) and Muon; for eager AdamW also
   the time per step without logging (the host never waits for the device) and logging every step;
2. checkpoint save / load times and time to resume for `small` and `medium`;
3. a run interrupted half-way and resumed gives the uninterrupted run's next losses (exactly in float32,
   within bf16 noise on the GPU);
4. a 1-process `torchrun` run (NCCL on the GPU), with ``--fsdp --async-save`` (``--smoke``: the same run in
   this process, given the environment torchrun gives one worker, on gloo);
5. generation tokens/s with the KV cache;
6. ``--fsdp`` (FSDP2 in a group of one process): tokens/s, MFU and peak memory, and the training time lost per
   step checkpoint (sharded) written in the foreground and with ``--async-save`` (benchmarks/checkpoint_cost.py).

The `medium` shape also runs as ``--arch llama`` (a Llama model of the same size), eager and compiled.
With ``--smoke`` every model is `tiny`
and the figures are CPU figures: the report says that no GPU figures were made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt"
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoint_cost import time_lost_per_checkpoint  # noqa: E402  (beside this script)


class Check:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            figures = fn()
            self.rows.append((name, "ok", f"{figures} ({time.perf_counter() - t0:.0f} s)"))
        except Exception as exc:  # one failed check must not hide the others
            self.rows.append((name, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        print(f"{self.rows[-1][1]:6s} {name}: {self.rows[-1][2]}", flush=True)

    def table(self) -> str:
        lines = ["| check | result | figures |", "| --- | --- | --- |"]
        return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in self.rows])


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """The environment torchrun gives a single worker, so that ``--fsdp`` runs in this process (a group of one)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="run on the CPU with tiny sizes (no GPU figures)")
    p.add_argument("--steps", type=int, default=None, help="training steps per throughput row")
    p.add_argument("--write", action="store_true", help="record the table in docs/benchmarks.md (GPU only)")
    a = p.parse_args()

    from openllm.checkpoint import format as ck
    from openllm.data.prepare import prepare_dataset
    from openllm.inference.generate import SamplingOptions, generate_ids
    from openllm.inference.loading import load_model
    from openllm.training.config import TrainConfig
    from openllm.training.loop import train

    gpu = torch.cuda.is_available() and not a.smoke
    if not gpu and not a.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke to exercise the same paths on the CPU")
    device, dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    steps = a.steps or (30 if gpu else 4)
    big, bigger = ("small", "medium") if gpu else ("tiny", "tiny")
    shape = {"batch_size": 16, "seq_len": 1024} if gpu else {"batch_size": 4, "seq_len": 32}
    work = Path(tempfile.mkdtemp(prefix="openllm-gpu-check-"))
    ds = prepare_dataset([CORPUS], work / "data", vocab_size=8192 if gpu else 400, workers=1)
    check = Check()
    quiet = lambda _m: None  # noqa: E731

    def config(out: str, **changes) -> TrainConfig:
        base = dict(
            data=str(ds.path),
            output_dir=str(work / out),
            device=device,
            dtype=dtype,
            log_every=10**6,
            eval_every=10**6,
            save_every=10**6,
            eval_batches=2,
            warmup_steps=2,
            max_steps=steps,
            **shape,
        )
        return TrainConfig(**{**base, **changes})

    def later_rows(out: str) -> list[dict]:
        rows = [json.loads(x) for x in (work / out / "metrics.jsonl").read_text().splitlines()]
        return rows[len(rows) // 2 :]  # past compilation and warm-up

    def step_ms(rows: list[dict]) -> float:
        # the mean, not the median: between log lines the host runs ahead, and the wait for the device is
        # booked on the step that logs
        return 1e3 * statistics.mean(r["step_time"] for r in rows)

    def throughput(
        size: str, compile: bool, optimizer: str, arch: str = "gpt2", logged_too: bool = False, fsdp: bool = False
    ):
        def fn() -> str:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            out = (
                f"tp-{size}-{compile}-{optimizer}" + ("" if arch == "gpt2" else f"-{arch}") + ("-fsdp" if fsdp else "")
            )
            with one_process_group() if fsdp else contextlib.nullcontext():
                train(
                    config(out, model_size=size, compile=compile, optimizer=optimizer, arch=arch, fsdp=fsdp), log=quiet
                )
            later = later_rows(out)
            tps = statistics.median(r["tokens_per_second"] for r in later)
            mfu = [r["mfu"] for r in later if r.get("mfu") is not None]
            mem = torch.cuda.max_memory_allocated() / 2**20 if gpu else later[-1]["memory_mb"]
            text = f"{tps:,.0f} tokens/s" + (f", MFU {statistics.median(mfu):.1%}" if mfu else "") + f", {mem:,.0f} MB"
            if logged_too:  # the same run logging every step: each log line waits for the device
                logged = out + "-logged"
                train(
                    config(logged, model_size=size, compile=compile, optimizer=optimizer, arch=arch, log_every=1),
                    log=quiet,
                )
                text += f"; per step {step_ms(later):.1f} ms unlogged, {step_ms(later_rows(logged)):.1f} ms logging every step"
            return text

        return fn

    for size in dict.fromkeys((big, bigger)):
        for compile_, optimizer in ((False, "adamw"), (True, "adamw"), (False, "muon")):
            if size == bigger and size != big and optimizer == "muon":
                continue  # the medium row with Muon adds little to the small one and costs a minute
            name = f"train {size} {'compiled' if compile_ else 'eager'} {optimizer}"
            if compile_ and not gpu:  # torch.compile of a CPU model takes most of a minute: the GPU run covers it
                check.rows.append((name, "not run", "--smoke leaves compilation out"))
                continue
            check.run(name, throughput(size, compile_, optimizer, logged_too=not compile_ and optimizer == "adamw"))
    for compile_ in (False, True):
        name = f"train {bigger} as llama {'compiled' if compile_ else 'eager'} adamw"
        if compile_ and not gpu:
            check.rows.append((name, "not run", "--smoke leaves compilation out"))
            continue
        check.run(name, throughput(bigger, compile_, "adamw", arch="llama"))

    def checkpoints(size: str):
        def fn() -> str:
            out = f"tp-{size}-False-adamw"
            file = work / out / "final_model.pt"
            t0 = time.perf_counter()
            ckpt = ck.load_checkpoint(file)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ck.save_checkpoint(ckpt, work / f"copy-{size}.pt")
            save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            train(config(out, model_size=size, resume=str(file), max_steps=steps + 1), log=quiet)
            resume_s = time.perf_counter() - t0
            return f"{file.stat().st_size / 2**20:,.0f} MB: save {save_s:.2f} s, load {load_s:.2f} s, resume + 1 step {resume_s:.1f} s"

        return fn

    for size in dict.fromkeys((big, bigger)):
        check.run(f"checkpoint {size}", checkpoints(size))

    def resume_matches() -> str:
        n = 2 * max(steps // 2, 2)
        straight = train(config("straight", model_size=big, max_steps=n), log=quiet)
        train(config("halves", model_size=big, max_steps=n // 2), log=quiet)
        resumed = train(config("halves", model_size=big, max_steps=n, resume="auto"), log=quiet)
        a_log = ck.load_checkpoint(straight.final_checkpoint)["training_log"][n // 2 :]
        b_log = ck.load_checkpoint(resumed.final_checkpoint)["training_log"][n // 2 :]
        diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a_log, b_log, strict=True))
        limit = 5e-2 if gpu else 0.0  # bf16 kernels are not bit-reproducible on every GPU; float32 CPU is
        if diff > limit:
            raise AssertionError(f"resumed losses differ by {diff:.3g} (limit {limit})")
        return f"{len(a_log)} losses after the resume, largest difference {diff:.2g}"

    check.run("resume continues the uninterrupted run", resume_matches)

    def torchrun() -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "openllm", "train",
               "--data", str(ds.path), "--output-dir", str(work / "ddp"), "--model-size", big, "--max-steps", "3",
               "--fsdp", "--async-save", "--save-every", "2",
               "--device", device, "--dtype", dtype, "--sample-tokens", "0",
               *[x for k, v in shape.items() for x in (f"--{k.replace('_', '-')}", str(v))]]  # fmt: skip
        where = "1 process"
        if gpu:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1])
        else:  # --smoke: the same run in this process, as torchrun's one worker (the tests start torchrun itself)
            where = "in this process, as torchrun's worker (--smoke)"
            with one_process_group():
                train(TrainConfig(**{**config("ddp", model_size=big).given(), "max_steps": 3, "save_every": 2,
                                     "fsdp": True, "async_save": True, "sample_tokens": 0}), log=quiet)  # fmt: skip
        backend = "NCCL" if gpu else "gloo"
        if not ck.verify_checkpoint(work / "ddp" / "checkpoint_step_2").ok:
            raise AssertionError("the sharded checkpoint written in the background does not verify")
        return f"{where}, {backend}, --fsdp --async-save: reached step 3, sharded checkpoint verifies"

    check.run("torchrun", torchrun)

    if gpu:  # (--smoke: the torchrun row trains with --fsdp)
        check.run(f"train {big} fsdp adamw", throughput(big, False, "adamw", fsdp=True))
    else:
        check.rows.append((f"train {big} fsdp adamw", "not run", "--smoke: the torchrun row trains with --fsdp"))

    def checkpoint_cost() -> str:
        def run(out: str, changes: dict) -> Path:
            with one_process_group():
                cfg = config(f"cost-{out}", model_size=big, fsdp=True, **{"max_steps": n, **changes})
                return train(cfg, log=quiet).run_dir  # type: ignore[union-attr]

        n = max(steps, 4)
        sync, background, saves = time_lost_per_checkpoint(
            run, n, n // 2 if not gpu else 5, repeats=1 if not gpu else 2
        )
        ratio = f"{background / sync:.2f}" if sync > 0 else "n/a"
        return f"sharded, {saves} a run: {sync:.2f} s lost per checkpoint, {background:.2f} s with --async-save (ratio {ratio})"

    if gpu:
        check.run(f"checkpoint {big} fsdp sync vs async", checkpoint_cost)
    else:  # (the torchrun row writes a sharded checkpoint in the background; timing it on tiny says nothing)
        check.rows.append((f"checkpoint {big} fsdp sync vs async", "not run", "--smoke leaves the timing out"))

    def generation() -> str:
        loaded = load_model(work / f"tp-{big}-False-adamw" / "final_model.pt", device)
        ids = loaded.tokenizer.prompt_ids("ROMEO:")
        n = 256 if gpu else 32
        opts = SamplingOptions(max_new_tokens=n, temperature=0)
        list(generate_ids(loaded.model, ids, SamplingOptions(max_new_tokens=4, temperature=0), device))  # warm up
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = len(list(generate_ids(loaded.model, ids, opts, device)))
        if gpu:
            torch.cuda.synchronize()
        return f"{got / (time.perf_counter() - t0):,.0f} tokens/s ({got} tokens, greedy, KV cache)"

    check.run(f"generate {big}", generation)

    shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name() if gpu else "CPU (--smoke): no GPU figures were made"
    report = f"device: {where}; torch {torch.__version__}\n\n{check.table()}"
    print("\n" + report)
    if a.write and gpu:
        from report import write_section

        write_section(ROOT / "docs" / "benchmarks.md", "GPU figures", f"## GPU figures\n\n{report}\n")
    sys.exit(1 if any(r[1] == "FAILED" for r in check.rows) else 0)


if __name__ == "__main__":
    main()
