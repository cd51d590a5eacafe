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


def _checked(convert: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse ``type`` that converts the text and checks the value, naming ``what`` it expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_int_value = _checked(int, lambda v: True, "an integer")
_float_value = _checked(float, lambda v: True, "a number")
_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a finite number > 0")
_fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
_fraction_incl = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_port = _checked(int, lambda v: 0 < v < 65536, "a port number 1-65535")


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


# -------------------------------------------------------------------------------------- train

_TRAIN_HELP = {
    "data": "a prepared dataset directory (from `openllm prepare`)",
    "data_file": "raw text to prepare on the fly (cached in OUTPUT_DIR/dataset); default: the bundled corpus",
    "validation_data": "a text file to validate on (default: hold out 10%% of the training documents)",
    "tokenizer_dir": "a directory with tokenizer.model to use instead of training one",
    "model_size": "preset: tiny, small, medium or large (default tiny)",
    "vocab_size": "tokenizer vocabulary when one is trained (default: the preset's)",
    "max_steps": "optimizer steps to train to", "output_dir": "run directory (default runs/openllm)",
    "save_every": "write checkpoint_step_N.pt every N steps", "eval_every": "validate every N steps",
    "eval_batches": "validation batches per evaluation (all of the validation text when it is smaller)",
    "log_every": "plain log line every N steps when not on a terminal",
    "early_stopping_patience": "stop after N evaluations without improvement (0: never)",
    "early_stopping_min_delta": "smallest decrease of validation loss that counts as improvement",
    "batch_size": "sequences per micro-batch (per process)", "seq_len": "tokens per sequence",
    "gradient_accumulation_steps": "micro-batches per optimizer step", "learning_rate": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay", "warmup_steps": "linear warmup steps",
    "lr_decay_steps": "step at which the cosine decay reaches --min-lr (default --max-steps)",
    "weight_decay": "AdamW weight decay (matrices only)", "grad_clip": "clip the gradient norm (0: off)",
    "dropout": "dropout probability", "seed": "seed for initialisation, data order and split",
    "device": "auto, cpu or cuda", "dtype": "autocast dtype: float32, bfloat16 or float16 (CUDA only)",
    "compile": "torch.compile the model", "activation_checkpointing": "recompute activations to save memory",
    "keep_last": "step checkpoints to keep (the best and the resumed-from one are always kept)",
    "resume": "continue from a checkpoint: auto (newest good one in --output-dir) or a PATH",
    "allow_data_change": "allow resuming on a different dataset",
    "reset_early_stopping": "train on although the resumed run had stopped early",
    "max_bad_steps": "consecutive non-finite steps before rolling back and stopping (default 5)",
    "tensorboard": "also write TensorBoard event files to OUTPUT_DIR/tensorboard",
    "peak_flops": "peak FLOP/s of the device for MFU (known GPUs are detected)",
}


def _add_train(sub) -> None:
    from openllm.config import DEFAULTS, TRAIN_OPTION_NAMES, TrainConfig

    p = sub.add_parser("train", help="train (or resume) a model",
                       description="Train a GPT model with crash-safe checkpoints, validation, best-model tracking, "
                       "early stopping and exact resume. Every option can also come from a YAML file (--config); "
                       "command-line values win.")
    p.add_argument("--config", help="YAML file of options (keys as the option names, with - or _)")
    p.add_argument("--sample-prompt", default="", help="prompt of the sample printed at the end")
    p.add_argument("--sample-tokens", type=_nonneg_int, default=120, help="length of the sample printed at the end (0: none)")
    types = TrainConfig.__annotations__
    for name in TRAIN_OPTION_NAMES:
        flag = "--" + name.replace("_", "-")
        kind = types[name]
        help_text = _TRAIN_HELP.get(name, "")
        if name in DEFAULTS and DEFAULTS[name] not in (None, False):
            help_text += f" (default {DEFAULTS[name]})"
        if "bool" in kind:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name == "resume":
            p.add_argument(flag, nargs="?", const="auto", default=None, metavar="auto|PATH", help=help_text)
        elif "int" in kind:
            p.add_argument(flag, type=_int_value, default=None, help=help_text)
        elif "float" in kind:
            p.add_argument(flag, type=_float_value, default=None, help=help_text)
        elif name in ("device", "dtype"):
            choices = ["auto", "cpu", "cuda"] if name == "device" else ["float32", "bfloat16", "float16"]
            p.add_argument(flag, choices=choices, default=None, help=help_text)
        else:
            p.add_argument(flag, default=None, help=help_text)
    p.set_defaults(func=_run_train)


def load_yaml_options(path: str) -> dict:
    """Options from a YAML file, keys normalised to field names; unknown keys are an error."""
    import yaml

    from openllm.config import TRAIN_OPTION_NAMES

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise OpenLLMError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OpenLLMError(f"config file {path} is not valid YAML: {(str(exc).strip().splitlines() or ['?'])[0]}") from None
    if not isinstance(data, dict):
        raise OpenLLMError(f"config file {path} must hold a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in TRAIN_OPTION_NAMES:
            raise OpenLLMError(f"config file {path}: unknown option {key!r}")
        if value is None:
            raise OpenLLMError(f"config file {path}: option {key!r} has no value")
        out[name] = value
    return out


def train_config_from_args(args):
    from openllm.config import TRAIN_OPTION_NAMES, TrainConfig

    options = load_yaml_options(args.config) if args.config else {}
    options.update({k: getattr(args, k) for k in TRAIN_OPTION_NAMES if getattr(args, k) is not None})
    return TrainConfig(**options)


def _run_train(args) -> int:
    from openllm.train import train

    result = train(train_config_from_args(args))
    if result is None or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"done: {result.stop_reason}; best validation loss {result.best_validation_loss:.4f} at step "
          f"{result.best_step}; run directory {result.run_dir}")
    if args.sample_tokens and (result.run_dir / "best_model.pt").is_file():
        from openllm.generate import SamplingOptions, generate_text
        from openllm.loading import load_model

        loaded = load_model(result.run_dir / "best_model.pt")
        text = generate_text(loaded.model, loaded.tokenizer, args.sample_prompt,
                             SamplingOptions(max_new_tokens=args.sample_tokens, temperature=0.8, seed=0))
        print(f"--- sample from best_model.pt ---\n{args.sample_prompt}{text}\n---")
    return 0


# ----------------------------------------------------------------------------------- generate

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model",
                       description="Generate text with a key/value cache. MODEL is a checkpoint file, a run "
                       "directory (its best_model.pt) or an exported directory. Tokens stream as they come.")
    p.add_argument("--model", required=True, help="checkpoint file, run directory or exported directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=_nonneg_int, default=40, help="0 turns top-k off")
    p.add_argument("--top-p", type=_fraction_incl, default=0.95)
    p.add_argument("--repetition-penalty", type=_positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from openllm.generate import SamplingOptions, generate_ids, prompt_ids
    from openllm.launch import resolve_device
    from openllm.loading import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    tok = loaded.tokenizer
    for i in range(args.num_samples):
        opts = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                               seed=None if args.seed is None else args.seed + i)
        ids, dropped = prompt_ids(tok, args.prompt, loaded.model.config.block_size, args.max_new_tokens)
        if dropped:
            print(f"note: the prompt is longer than the context; its first {dropped} tokens were dropped", file=sys.stderr)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        out: list[int] = []
        shown = ""
        for token in generate_ids(loaded.model, ids, opts, device):
            out.append(token)
            text = tok.decode(out)  # decode the whole tail so multi-byte characters come out whole
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write(tok.decode(out)[len(shown):] + "\n")
    return 0


# ------------------------------------------------------------------------ convert / export

def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="import raw weights (legacy, Hugging Face GPT-2, nanoGPT) as a full checkpoint",
                       description="Convert a legacy OpenLLM export, a Hugging Face GPT-2 directory, a nanoGPT ckpt.pt or "
                       "an openllm export into a run directory whose best_model.pt can be resumed, inspected and compared. "
                       "The input kind is detected.")
    p.add_argument("--input-dir", required=True, help="directory (or nanoGPT ckpt.pt file) to import")
    p.add_argument("--output-dir", required=True, help="run directory to write")
    p.add_argument("--training-steps", type=_nonneg_int, default=None, help="steps the weights were trained for")
    p.add_argument("--eval-data", help="text file to measure the real validation loss on")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model to use when the input has none")
    p.add_argument("--force", action="store_true", help="overwrite an existing best_model.pt in --output-dir")
    p.set_defaults(func=_run_convert)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _run_convert(args) -> int:
    from openllm.convert import convert

    r = convert(args.input_dir, args.output_dir, training_steps=args.training_steps, eval_data=args.eval_data,
                tokenizer=args.tokenizer, force=args.force)
    print(f"converted {r.kind} weights from {args.input_dir} to {r.output_dir}/best_model.pt (step {r.step:,})")
    print(f"  input:  {_mb(r.input_bytes)}")
    print(f"  output: {_mb(r.output_bytes)} = weights {_mb(r.components['model_state_dict'])}, optimizer state "
          f"{_mb(r.components['optimizer_state_dict'])} (fresh), logs "
          f"{_mb(r.components['training_log'] + r.components['validation_log'])}")
    if r.best_validation_loss is not None:
        print(f"  validation loss on {args.eval_data}: {r.best_validation_loss:.4f}")
    for note in r.notes:
        print(f"  note: {note}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face directory that stock transformers loads",
                       description="Export a checkpoint (or a run directory's best model) as a GPT-2 directory: "
                       "config.json, model.safetensors, tokenizer files, generation_config.json and a model card.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty --output-dir")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from openllm.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.output_dir, force=args.force)
    print(f"exported to {r.output_dir}: " + ", ".join(f"{k} ({_mb(v)})" for k, v in r.files.items()))
    return 0


# ------------------------------------------------------------------ inspect / compare / verify

def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show what a checkpoint, run directory or export holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    from openllm.inspect_ckpt import describe, format_description

    info = describe(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_description(info))
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare checkpoints, run directories or exports side by side")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from openllm.inspect_ckpt import describe, format_comparison

    infos = [describe(p) for p in args.paths]
    print(json.dumps(infos, indent=2, default=str) if args.json else format_comparison(infos))
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a checkpoint's integrity (checksum, keys, shapes, loading)",
                       description="Verify a checkpoint file or every checkpoint of a run directory; exit status 1 "
                       "and the reason when anything is wrong.")
    p.add_argument("path")
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from openllm.inspect_ckpt import verify_path

    results = verify_path(args.path)
    for v in results:
        print(f"{'ok  ' if v.ok else 'BAD '} {v.path}" + ("" if v.ok else f": {'; '.join(v.problems)}"))
    return 0 if all(v.ok for v in results) else 1


# ------------------------------------------------------------------------------- eval / plot

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out text",
                       description="Evaluate one or more models on a text file (or a prepared dataset's validation "
                       "split) with sliding windows; several models give one comparison table.")
    p.add_argument("--model", nargs="+", required=True, help="checkpoint files, run directories or exports")
    p.add_argument("--data", required=True, help="a text file, or a prepared dataset directory (its val split)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=_positive_int, default=None, help="window step (default: half the window; --stride = --seq-len reproduces the trainer's validation)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--allow-training-data", action="store_true", help="report even on text the model trained on")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from pathlib import Path

    from openllm.data import load_dataset
    from openllm.evaluate import encode_file, evaluate_dataset, evaluate_file, training_sources
    from openllm.launch import resolve_device
    from openllm.loading import load_model

    device = resolve_device(args.device)
    results = []
    for path in args.model:
        loaded = load_model(path, device)
        hashes, fingerprint = training_sources(loaded.checkpoint)
        if Path(args.data).is_dir():
            ds = load_dataset(args.data)
            if ds.meta["tokenizer_sha256"] != loaded.tokenizer.sha256:
                raise OpenLLMError(f"{args.data} was tokenized with a different tokenizer than {path}")
            r = evaluate_dataset(loaded.model, args.data, "val", args.seq_len, args.stride, args.batch_size, device)
        else:
            if hashes and not args.allow_training_data:
                _, _, sha = encode_file(loaded.tokenizer, args.data)
                if sha in hashes:
                    raise OpenLLMError(f"{args.data} is the text {path} was trained on (its training split included); "
                                       "pass --allow-training-data to report anyway")
            r = evaluate_file(loaded.model, loaded.tokenizer, args.data, args.seq_len, args.stride, args.batch_size, device)
        results.append({"model": str(path), **r.to_dict()})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        width = max(len(r["model"]) for r in results)
        print(f"{'model'.ljust(width)}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>10}")
        for r in results:
            print(f"{r['model'].ljust(width)}  {r['loss']:8.4f}  {r['perplexity']:10.2f}  {r['bits_per_byte']:9.4f}  {r['tokens']:>10,}")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's training curves",
                       description="Training and validation loss against step, learning rate, the best checkpoint and "
                       "the stopping point marked. Written automatically at the end of training.")
    p.add_argument("run_dir")
    p.add_argument("--output", help="PNG file (default RUN_DIR/training_curves.png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args) -> int:
    from openllm.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.output)
    except ImportError:
        raise OpenLLMError("plotting needs matplotlib: pip install 'openllm[plot]'") from None
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------- serve

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a web page",
                       description="POST /v1/completions (streaming with server-sent events), GET /v1/models, "
                       "GET /health and a web page at /. Binds to 127.0.0.1 unless told otherwise.")
    p.add_argument("--model", required=True, help="checkpoint file, run directory or exported directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-tokens", type=_positive_int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-queue", type=_positive_int, default=64, help="requests waiting before the server answers 429")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from openllm.launch import resolve_device
    from openllm.server import ServerLimits, serve

    import importlib.util

    if not (importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn")):
        raise OpenLLMError("serving needs FastAPI and uvicorn: pip install 'openllm[serve]'") from None
    serve(args.model, args.host, args.port, ServerLimits(max_tokens=args.max_tokens, max_queue=args.max_queue),
          resolve_device(args.device))
    return 0


# ---------------------------------------------------------------------------------------- main

COMMANDS: list[Callable] = [_add_prepare, _add_train, _add_generate, _add_eval, _add_convert, _add_export,
                            _add_inspect, _add_compare, _add_verify, _add_plot, _add_serve]


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
        kind = "stopped" if exc.exit_code != 2 else "error"
        print(f"openllm {args.command}: {kind}: {exc}", file=sys.stderr)
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
