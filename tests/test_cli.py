import pytest

from openllm.cli import build_parser, main
from tests.conftest import cli


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
    r = cli("prepare", "--input", "/does/not/exist", "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args", [["--vocab-size", "-3"], ["--vocab-size", "abc"], ["--val-fraction", "1.5"], ["--doc-mode", "sentence"]]
)
def test_invalid_option_values(args, small_corpus, tmp_path):
    r = cli("prepare", "--input", str(small_corpus), "--output-dir", str(tmp_path / "x"), *args)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "x").exists()


def test_prepare_command_reports_counts(small_corpus, tmp_path):
    r = cli("prepare", "--input", str(small_corpus), "--output-dir", str(tmp_path / "d"), "--vocab-size", "400")
    assert r.returncode == 0, r.stderr
    assert "400 documents read" in r.stdout
    assert (tmp_path / "d" / "train.bin").is_file() and (tmp_path / "d" / "meta.json").is_file()


def test_every_option_has_help_and_prints_its_default_once():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help and action.help.strip(), f"openllm {name} {action.option_strings}: no help text"
            assert action.help.count("(default") <= 1, f"openllm {name} {action.option_strings}: {action.help}"
    text = sub.choices["train"].format_help()
    assert "(default: tiny)" in text and "(default tiny) (default tiny)" not in text


def test_library_defaults_are_the_command_line_defaults():
    import inspect

    from openllm.data.prepare import prepare_dataset
    from openllm.inference.generate import SamplingOptions
    from openllm.inference.server import ServerLimits

    args = build_parser().parse_args(["prepare", "--input", "x", "--output-dir", "y"])
    for param in inspect.signature(prepare_dataset).parameters.values():
        if param.default is not inspect.Parameter.empty:
            assert getattr(args, param.name) == param.default, param.name
    args = build_parser().parse_args(["generate", "--model", "m"])
    assert (args.temperature, args.top_k, args.top_p, args.max_new_tokens) == (
        SamplingOptions.temperature,
        SamplingOptions.top_k,
        SamplingOptions.top_p,
        SamplingOptions.max_new_tokens,
    )
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.max_tokens, args.max_queue) == (ServerLimits.max_tokens, ServerLimits.max_queue)


def test_serve_without_the_server_extra_names_the_package(tmp_path):
    # a stand-in `fastapi` that cannot be imported, placed first on the path
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text("raise ImportError('not installed')\n")
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi',):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    import os

    r = cli(
        "serve",
        "--model",
        str(tmp_path),
        env={"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert r.returncode == 2, r.stderr
    assert "pip install 'openllm[serve]'" in r.stderr and "fastapi" in r.stderr and "internal error" not in r.stderr
