import subprocess
import sys

import pytest

from openllm.cli import build_parser, main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "openllm", *args], capture_output=True, text=True, cwd=cwd)


def commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(sub.choices)


def test_help_for_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    for name in commands():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: openllm " + name in capsys.readouterr().out


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    r = run_cli("prepare", "--input", "/does/not/exist", "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [["--vocab-size", "-3"], ["--vocab-size", "abc"], ["--val-fraction", "1.5"],
                                  ["--doc-mode", "sentence"]])
def test_invalid_option_values(args, small_corpus, tmp_path):
    r = run_cli("prepare", "--input", str(small_corpus), "--output-dir", str(tmp_path / "x"), *args)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "x").exists()


def test_prepare_command_reports_counts(small_corpus, tmp_path):
    r = run_cli("prepare", "--input", str(small_corpus), "--output-dir", str(tmp_path / "d"), "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    assert "400 documents read" in r.stdout
    assert (tmp_path / "d" / "train.bin").is_file() and (tmp_path / "d" / "meta.json").is_file()
