"""The ``openllm`` command line: a thin shell over the library functions.

Every command parses its options, calls one library function and prints the result. Errors in
the user's input surface as :class:`~openllm.errors.OpenLLMError` and become one line on stderr
with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from openllm import __version__
from openllm.errors import OpenLLMError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


# ------------------------------------------------------------------------------------ prepare

def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="clean, de-duplicate, split and tokenize text files",
                       description="Prepare text files for training: normalise whitespace, drop duplicate "
                       "documents, hold out validation documents, train a SentencePiece tokenizer and write "
                       "train.bin / val.bin / meta.json. Documents are paragraphs separated by blank lines "
                       "(or lines, with --doc-mode line).")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--output-dir", required=True, help="dataset directory to write")
    p.add_argument("--vocab-size", type=_positive_int, default=4000, help="tokenizer vocabulary (default 4000)")
    p.add_argument("--validation-file", help="use this file as validation text instead of a random split")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, help="share of documents held out (default 0.1)")
    p.add_argument("--tokenizer", help="use an existing tokenizer.model (file or directory) instead of training one")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split")
    p.add_argument("--doc-mode", choices=["paragraph", "line"], default="paragraph")
    p.add_argument("--force", action="store_true", help="overwrite a different dataset in --output-dir")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from openllm.data import prepare_dataset

    ds = prepare_dataset(args.input, args.output_dir, vocab_size=args.vocab_size,
                         validation_file=args.validation_file, val_fraction=args.val_fraction,
                         tokenizer=args.tokenizer, seed=args.seed, doc_mode=args.doc_mode, force=args.force)
    m = ds.meta
    print(f"prepared {ds.path}: {m['documents_read']:,} documents read, {m['duplicates_dropped']:,} duplicates dropped, "
          f"{m['train_documents']:,} train / {m['val_documents']:,} validation documents, "
          f"{m['train_tokens']:,} / {m['val_tokens']:,} tokens, vocab {m['vocab_size']:,}, {m['seconds']:.2f} s")
    return 0


# ---------------------------------------------------------------------------------------- main

COMMANDS: list[Callable] = [_add_prepare]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="openllm", description="Train GPT language models from scratch on your own text.")
    parser.add_argument("--version", action="version", version=f"openllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OpenLLMError as exc:
        print(f"openllm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"openllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("OPENLLM_DEBUG"):
            raise
        print(f"openllm {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set OPENLLM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
