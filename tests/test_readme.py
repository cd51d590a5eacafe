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
        block.replace("max_steps=500", "max_steps=4").replace("vocab_size=4000", "vocab_size=420")
    )
    (tmp_path / "corpus.txt").write_text(small_corpus.read_text())
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "mine" / "best_model.pt").is_file() and r.stdout.strip()


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `openllm ...` command line in the bash blocks of README.md and docs/*.md (also those torchrun starts:
    ``torchrun ... -m openllm ARGS``), as argv lists."""
    import shlex

    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.match(r"[A-Z_][A-Z0-9_]*=", words[0]):  # (VAR=value openllm ...)
                    words = words[1:]
                if words[:1] == ["openllm"]:
                    found.append((f"{doc.name}: {line.strip()}", words[1:]))
                elif "torchrun" in words and "openllm" in words:  # torchrun ... -m openllm ARGS
                    at = words.index("openllm")
                    if words[at - 1] == "-m":
                        found.append((f"{doc.name}: {line.strip()}", words[at + 1 :]))
    return found


def test_every_documented_command_line_parses():
    """Each documented command names a real subcommand with real options and valid choices (the
    commands that can run here run in the tests of their modules)."""
    import contextlib
    import io

    import pytest

    from openllm.cli import command_parser

    commands = documented_commands()
    assert len(commands) > 15  # the extraction found the examples
    for where, argv in commands:
        err = io.StringIO()
        parser, rest = command_parser(argv)
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            parser.parse_args(rest)
            continue
        pytest.fail(f"{where}\n{err.getvalue()}")


def test_the_legacy_command_runs_on_a_fresh_clone_with_the_documented_layout(tmp_path):
    """The README's two legacy lines, run as written in an empty directory (as a fresh clone is), with a tiny
    model and a few steps instead of `small` for 10,000 steps; without the layout it is one error line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"make the\nlayout from the bundled corpus.*?```bash\n(.*?)```", text, re.S).group(1)
    make, legacy = block.strip().splitlines()
    assert legacy.startswith("python core/src/train_model_improved.py --model-size small --max-steps 10000")
    (tmp_path / "src" / "openllm" / "corpus").mkdir(parents=True)
    corpus = (ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (tmp_path / "src" / "openllm" / "corpus" / "tinyshakespeare.txt").write_text(corpus[:60_000])
    script = str(ROOT / "core" / "src" / "train_model_improved.py")
    run = legacy.replace("core/src/train_model_improved.py", script).replace("python ", f"{sys.executable} ", 1)
    run = run.replace("--model-size small --max-steps 10000", "--model-size tiny --max-steps 4 --vocab-size 400")
    run = run.replace("--save-every 500", "--save-every 2 --eval-every 2 --batch-size 4 --seq-len 32 --sample-tokens 0")
    missing = subprocess.run(run, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "data/clean/training_data.txt is not here" in missing.stderr
    assert not (tmp_path / "models").exists()
    made = subprocess.run(make.replace("python3 ", f"{sys.executable} ", 1), shell=True, cwd=tmp_path, timeout=60)
    assert made.returncode == 0 and (tmp_path / "data" / "clean" / "validation_data.txt").stat().st_size > 1000
    r = subprocess.run(run, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "models" / "improved-10k" / "best_model.pt").is_file()
