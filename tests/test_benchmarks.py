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
                "train tiny as llama compiled adamw"}  # fmt: skip
    assert set(results) == expected
    assert all(v == "ok" for k, v in results.items() if "compiled" not in k), results
