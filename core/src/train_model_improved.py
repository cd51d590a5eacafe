#!/usr/bin/env python3
"""Legacy entry point: ``python core/src/train_model_improved.py [options]``.

A thin shell over ``openllm train`` that keeps the legacy data layout as defaults:
training text ``data/clean/training_data.txt`` and, when present, the tokenizer in ``data/tokenizer/``.
Every ``openllm train`` option is accepted.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("openllm") is None:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from openllm.cli import main  # noqa: E402

LEGACY_TRAINING_DATA = "data/clean/training_data.txt"
LEGACY_TOKENIZER_DIR = "data/tokenizer"


def legacy_argv(argv: list[str]) -> list[str]:
    """``openllm train`` arguments for a legacy command line, with the legacy defaults filled in."""
    args = ["train", *argv]
    if not any(a.split("=")[0] in ("--data", "--data-file", "--config", "--resume") for a in argv):
        args += ["--data-file", LEGACY_TRAINING_DATA]
    if "--tokenizer-dir" not in argv and (Path(LEGACY_TOKENIZER_DIR) / "tokenizer.model").is_file():
        args += ["--tokenizer-dir", LEGACY_TOKENIZER_DIR]
    return args


def missing_legacy_data(args: list[str]) -> str | None:
    """The one-line explanation when the legacy default training text is asked for but absent."""
    if "--data-file" in args and args[args.index("--data-file") + 1] == LEGACY_TRAINING_DATA:
        if not Path(LEGACY_TRAINING_DATA).is_file():
            return (
                f"train_model_improved.py: error: the legacy training text {LEGACY_TRAINING_DATA} is not here "
                "(run from the directory that holds data/clean/, or give your own text with --data-file FILE "
                "and --validation-data FILE); nothing was written"
            )
    return None


if __name__ == "__main__":
    argv = legacy_argv(sys.argv[1:])
    problem = missing_legacy_data(argv)
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(argv))
