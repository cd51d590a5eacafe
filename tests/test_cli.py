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


@pytest.mark.parametrize(
    "module, extra, args",
    [
        ("fastapi", "serve", ["serve", "--model", "{tmp}"]),
        ("matplotlib", "plot", ["plot", "{tmp}"]),
        ("gguf", "gguf", ["export", "--checkpoint", "{tmp}", "--output-dir", "{tmp}/out", "--format", "gguf"]),
    ],
)
def test_a_missing_extra_names_what_installs_it(tmp_path, module, extra, args):
    # the package cannot be imported: a finder placed first on the path refuses it
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {module!r}:\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    import os

    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "internal error" not in r.stderr and module in r.stderr
    # a hint that works: the checkout's own set-up, or the distribution's real name (not "openllm")
    assert f"bash scripts/setup.sh {extra}" in r.stderr and f"pip install 'openllm-toolkit[{extra}]'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_every_options_default_passes_its_own_parser():
    """The `--tokenizer-sample-mb 32` class of bug: an option's parser refusing its own documented default."""
    import argparse

    from openllm.training.config import DEFAULTS  # train's options default to None ("not given") until resolved

    checked = 0
    for name in commands():
        sub = build_parser(name)
        parser = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        for action in parser._actions:
            default = DEFAULTS.get(action.dest) if name == "train" and action.default is None else action.default
            if action.type is None or default in (None, argparse.SUPPRESS):
                continue
            defaults = default if isinstance(default, list) else [default]
            for value in defaults:
                parsed = action.type(str(value))
                assert parsed == value, (name, action.dest, value, parsed)
                if action.choices:
                    assert parsed in action.choices, (name, action.dest)
                checked += 1
    assert checked > 25  # the walk found the options, train's among them


def test_every_command_takes_a_config_file_whose_values_go_through_each_options_parser(small_corpus, tmp_path, capsys):
    """`--config FILE.yaml` on every command: keys as option names (flag or destination, - or _), lists for
    options of several values, true/false for flags; the command line wins; a bad key or value is one line."""
    from openllm.cli import _with_options_file
    from openllm.core.options import options_file_argv

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        assert "--config" in command.format_help(), name
    (tmp_path / "p.yaml").write_text(f"input: [{small_corpus}]\noutput-dir: {tmp_path / 'ds'}\nvocab_size: 300\n")
    assert main(["prepare", "--config", str(tmp_path / "p.yaml"), "--vocab-size", "320"]) == 0
    assert "vocab 320" in capsys.readouterr().out  # the command line won over the file's 300
    (tmp_path / "i.yaml").write_text("json: true\n")
    assert _with_options_file(parser, ["inspect", "--config", str(tmp_path / "i.yaml"), "x"]) == [
        "inspect",
        "--json",
        "x",
    ]
    bad = {
        "vocab_size: 0\n": "expected a positive integer, got '0'",
        "nope: 1\n": "unknown option 'nope'",
        "vocab_size: [1, 2]\n": "option 'vocab_size' takes one value, got a list",
        "seed:\n": "option 'seed' has no value",
    }
    for text, words in bad.items():
        (tmp_path / "b.yaml").write_text(text)
        r = cli("prepare", "--config", str(tmp_path / "b.yaml"), "--input", str(small_corpus), "--output-dir",
                str(tmp_path / "never"))  # fmt: skip
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, (text, r.stderr)
        assert not (tmp_path / "never").exists()
    (tmp_path / "s.yaml").write_text("port: 8123\napi-key: k\n")
    assert options_file_argv(sub.choices["serve"], tmp_path / "s.yaml") == ["--port", "8123", "--api-key", "k"]
