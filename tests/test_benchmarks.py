"""The GPU check runs its code paths on the CPU (`--smoke`), so that it works the day a GPU is lent."""

import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_smoke_runs_every_path_on_the_cpu():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no GPU figures were made" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    results = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table}
    expected = {"train tiny eager adamw", "train tiny eager muon", "checkpoint tiny", "torchrun", "generate tiny",
                "resume continues the uninterrupted run", "train tiny compiled adamw", "train tiny as llama eager adamw",
                "train tiny as llama compiled adamw", "train tiny fsdp adamw", "checkpoint tiny fsdp sync vs async"}  # fmt: skip
    assert set(results) == expected
    assert all(v == "ok" for k, v in results.items() if "compiled" not in k and "fsdp" not in k), results
    figures = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in table}
    assert (
        "ms unlogged" in figures["train tiny eager adamw"]
        and "ms logging every step" in figures["train tiny eager adamw"]
    )


def test_the_benchmarks_say_which_kernels_ran_and_the_avx2_limits_take_effect():
    """`--as-avx2` sets ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA; the printed processor line is read back
    from a process started with them, so it shows what the kernels really were."""
    import os

    code = "import sys; sys.path.insert(0, 'benchmarks'); import report; print(report.processor())"

    def line(**env):
        clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    avx2 = line(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert "AVX2 kernels" in avx2 and "oneDNN Intel AVX2" in avx2 and "bf16 emulated" in avx2, avx2
    assert "limited by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in avx2
    lower = line(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")  # a limit below this CPU's own
    assert "DEFAULT kernels" in lower and "oneDNN Intel SSE4.1" in lower, lower


def test_throughput_benchmark_runs_and_writes_its_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--repeats",
            "1",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("processor: ") and "kernels" in r.stdout.splitlines()[0]
    text = out.read_text()
    assert "## Trainer throughput (muon, own kernels)" in text and "trainer / plain loop (median)" in text


def test_lora_memory_benchmark_smoke_prints_both_modes_and_their_ratios():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lora_memory.py"), "--smoke", "--output", "-"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines() if line.startswith("| ")]
    rows = {c[0]: c[1:] for c in cells}
    full, lora, ratio = rows["trainable parameters"]
    assert int(lora.replace(",", "")) < int(full.replace(",", "")) / 10 and 0 < float(ratio) < 0.1
    assert "MiB" in rows["peak memory (median)"][0] and float(rows["step time (median)"][2]) > 0


def test_finetune_chat_benchmark_smoke_scores_before_and_after(llama_run):
    r = subprocess.run(  # (on the suite's small Llama run as the base: training one is the same `openllm train`)
        [sys.executable, str(ROOT / "benchmarks" / "finetune_chat.py"), "--smoke", "--base", str(llama_run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines() if "%" in line]
    models, tasks = [row for row in rows if len(row) == 3], [row for row in rows if len(row) == 4]
    assert [row[0] for row in models] == ["base, before fine-tuning", "fine-tuned (best_model.pt)"]
    assert sum(int(row[1]) for row in tasks) == 20  # every held-out conversation counted under its task
    assert all(0 <= float(cell.rstrip("%")) <= 100 for row in rows for cell in row if cell.endswith("%"))


def test_near_dedup_benchmark_smoke_counts_every_planted_copy_once():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "near_dedup.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines() if "% |" in line]
    assert len(rows) == 5 and sum(int(row[1]) for row in rows) == 40  # the five kinds of copy, 40 planted
    assert rows[2][0] == "lines rewrapped" and rows[2][3] == "100.0%"  # the same words, whatever the lines
    assert "Recall" in r.stdout and "more per MB" in r.stdout
