"""The README's Python example runs as written, with fewer training steps and the small test corpus's
vocabulary so that it fits in the suite."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_python_example_runs(small_corpus, tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## From Python.*?```python\n(.*?)```", text, re.S).group(1)
    assert "max_steps=500" in block
    (tmp_path / "example.py").write_text(
        block.replace("max_steps=500", "max_steps=20").replace("vocab_size=4000", "vocab_size=420")
    )
    (tmp_path / "corpus.txt").write_text(small_corpus.read_text())
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "mine" / "best_model.pt").is_file() and r.stdout.strip()
