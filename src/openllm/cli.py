"""The ``openllm`` command line: a thin shell over the library functions.

Every command parses its options, calls one library function and prints the result. Errors in
the user's input surface as :class:`~openllm.core.errors.OpenLLMError` and become one line on stderr
with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from openllm import __version__

if TYPE_CHECKING:  # (the data layer is imported where a command runs, so that the CLI starts quickly)
    from openllm.data.dataset import PreparedDataset
from openllm.core.device import DEVICES
from openllm.core.errors import OpenLLMError
from openllm.core.options import (
    CONFIG_HELP,
    add_options,
    one_of,
    option_values,
    options_file_argv,
    port,
    positive_int,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line and exit status 2, and takes options only spelled whole
    (``--max-step 2`` is an error, not ``--max-steps``: a prefix that happens to match today may mean another
    option tomorrow)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# ------------------------------------------------------------------------------------ prepare


def _add_prepare(sub: Any) -> None:
    from openllm.data.prepare import prepare_dataset

    p = sub.add_parser(
        "prepare",
        help="clean, de-duplicate, split and tokenize text files",
        description="Prepare text files for training: normalise whitespace, drop duplicate "
        "documents, hold out validation documents, train a SentencePiece tokenizer and write "
        "train.bin / val.bin / meta.json. Documents are paragraphs separated by blank lines "
        "(or lines, with --doc-mode line). The parts of a sharded preparation (--num-shards) are joined with "
        "`openllm prepare merge PART_DIR... --output-dir DIR`.",
    )
    add_options(p, prepare_dataset)
    p.set_defaults(func=_run_prepare)


def _merge_parser() -> argparse.ArgumentParser:
    """`openllm prepare merge`: a parser of its own (prepare's takes --input files, not parts)."""
    m = _Parser(
        prog="openllm prepare merge",
        description="Join every part of a sharded preparation (prepare --num-shards N --shard-index K) into one "
        "dataset directory, equal to what one machine makes of all the inputs: duplicates and near-duplicates "
        "across parts are dropped, in reading order, and the parts' tokens are copied, not encoded again.",
    )
    m.add_argument(
        "parts", nargs="+", metavar="PART_DIR", help="the parts' dataset directories (every part, any order)"
    )
    m.add_argument("--output-dir", required=True, help="dataset directory to write")
    m.add_argument("--force", action="store_true", help="overwrite a dataset in --output-dir")
    m.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    m.set_defaults(func=_run_merge, command="prepare merge")
    return m


def _run_merge(args: argparse.Namespace) -> int:
    from openllm.data.merge import merge_parts

    ds = merge_parts(args.parts, args.output_dir, force=args.force)
    _print_prepared(ds)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from openllm.data.prepare import prepare_dataset

    _print_prepared(prepare_dataset(**option_values(args, prepare_dataset)))
    return 0


def _print_prepared(ds: PreparedDataset) -> None:
    m = ds.meta
    read_mb = sum(i["bytes"] for i in m["inputs"]) / 1e6
    skipped = sum((m.get("bad_records_skipped") or {}).values())
    print(
        f"prepared {ds.path}: {m['documents_read']:,} documents read, {m['duplicates_dropped']:,} duplicates dropped, "
        + (f"{skipped:,} bad records skipped, " if skipped else "")
        + (f"{m['documents_cut']:,} over-long documents cut, " if m.get("documents_cut") else "")
        + "".join(f"{n:,} dropped by --{k.replace('_', '-')}, " for k, n in m.get("filtered_documents", {}).items())
        + (
            (
                "near-duplicates left for `prepare merge`, "
                if m.get("part")
                else f"{m['near_duplicates_dropped']:,} near-duplicates dropped, "
            )
            if m.get("near_dedup")
            else ""
        )  # fmt: skip
        + f"{m['train_documents']:,} train / {m['val_documents']:,} validation documents, "
        f"{m['train_tokens']:,} / {m['val_tokens']:,} tokens, vocab {m['vocab_size']:,}; {read_mb:,.1f} MB in "
        f"{m['seconds']:.2f} s ({read_mb / max(m['seconds'], 1e-9):,.1f} MB/s), peak memory "
        f"{m['timing']['peak_rss_mb']:,.0f} MB"
    )


# -------------------------------------------------------------------------------------- train


def _add_train(sub: Any) -> None:
    from openllm.training.config import FINETUNE_ONLY, TrainConfig

    p = sub.add_parser(
        "train",
        help="train (or resume) a model",
        description="Train a GPT model with crash-safe checkpoints, validation, best-model tracking, "
        "early stopping and exact resume. Every option can also come from a YAML file (--config); "
        "command-line values win.",
    )
    add_options(p, TrainConfig, skip=FINETUNE_ONLY)
    p.set_defaults(func=_run_train)


def _add_finetune(sub: Any) -> None:
    from openllm.training.config import TRAIN_ONLY, TrainConfig

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on conversations (full or LoRA)",
        description="Fine-tune a model (a run directory or checkpoint of ours, or a Hugging Face directory) on "
        "conversations, with the trainer's guarantees: best model on validation loss, early stopping, exact "
        "resume (--resume auto), every checkpoint and record. The loss counts what the assistant says "
        "(--train-on); --lora-rank R trains low-rank adapters with the model frozen.",
    )
    add_options(p, TrainConfig, skip=TRAIN_ONLY)
    p.set_defaults(func=_run_train)


def train_config_from_args(args: argparse.Namespace) -> Any:
    from openllm.training.config import TrainConfig, load_yaml_options

    # (finetune's --config went through its parser: its `data` is the conversations' --data)
    options = load_yaml_options(args.config) if args.config and args.command == "train" else {}
    options.update({k: v for k, v in option_values(args, TrainConfig).items() if v is not None})
    return TrainConfig(**options)


def _run_train(args: argparse.Namespace) -> int:
    from openllm.finetune import finetune
    from openllm.training.loop import train

    result = (finetune if args.command == "finetune" else train)(train_config_from_args(args))
    if result is None or os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(
        f"done: {result.stop_reason}; best validation loss {result.best_validation_loss:.4f} at step "
        f"{result.best_step}; run directory {result.run_dir}"
    )
    sample_tokens = (result.config.sample_tokens or 0) if result.config else 0
    prompt = (result.config.sample_prompt or "") if result.config else ""
    if sample_tokens and (result.run_dir / "best_model.pt").is_file():
        from openllm.inference.generate import PromptTooLong, SamplingOptions, generate_text
        from openllm.inference.loading import load_model

        loaded = load_model(result.run_dir / "best_model.pt")
        try:
            text = generate_text(
                loaded.model,
                loaded.tokenizer,
                prompt,
                SamplingOptions(max_new_tokens=sample_tokens, temperature=0.8, seed=0),
            )
        except PromptTooLong as exc:  # the run is complete; only its sample cannot be made
            print(f"warning: no sample printed: --sample-prompt: {exc}", file=sys.stderr)
            return 0
        print(f"--- sample from best_model.pt ---\n{prompt}{text}\n---")
        from openllm.checkpoint.report import SAMPLE, write_report
        from openllm.core.fileio import atomic_write_text

        atomic_write_text(result.run_dir / SAMPLE, prompt + text)
        write_report(result.run_dir)  # the report now shows the sample too
    return 0


# ----------------------------------------------------------------------------------- generate


def _add_generate(sub: Any) -> None:
    from openllm.inference.generate import SamplingOptions

    p = sub.add_parser(
        "generate",
        help="generate text from a model",
        description="Generate text with a key/value cache. MODEL is a checkpoint file, a run "
        "directory (its best_model.pt) or an exported directory. Tokens stream as they come.",
    )
    p.add_argument("--model", required=True, help="checkpoint file, run directory or exported directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples to generate (default: 1)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=f"{one_of(DEVICES)} (default: auto)")
    add_options(p, SamplingOptions)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import dataclasses

    from openllm.core.device import resolve_device
    from openllm.inference.generate import SamplingOptions, TextStream, choice_seed, generate_ids, prompt_ids
    from openllm.inference.loading import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    base = SamplingOptions(**option_values(args, SamplingOptions))
    context = loaded.model.config.block_size
    ids, dropped = prompt_ids(loaded.tokenizer, args.prompt, context)
    if dropped:
        print(
            f"warning: the prompt is {context + dropped:,} tokens, longer than the model's context of {context:,}: "
            f"generating from its last {context:,} tokens (the first {dropped:,} were dropped)",
            file=sys.stderr,
        )
    for i in range(args.num_samples):
        opts = dataclasses.replace(base, seed=choice_seed(base.seed, i))
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        stream = TextStream(loaded.tokenizer, ids)
        for token in generate_ids(loaded.model, ids, opts, device, loaded.tokenizer.eos_id):
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
        sys.stdout.write(stream.finish() + "\n")
    return 0


# ------------------------------------------------------------------------ convert / export


def _add_convert(sub: Any) -> None:
    from openllm.interop.convert import convert

    p = sub.add_parser(
        "convert",
        help="import raw weights (legacy, Hugging Face GPT-2 or Llama, nanoGPT) as a full checkpoint",
        description="Convert a legacy OpenLLM export, a Hugging Face GPT-2, Llama or Qwen3 directory, a nanoGPT "
        "ckpt.pt or "
        "an openllm export into a run directory whose best_model.pt can be resumed, inspected and compared. "
        "The input kind is detected.",
    )
    add_options(p, convert)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from openllm.interop.convert import convert

    r = convert(**option_values(args, convert))
    print(f"converted {r.kind} weights from {args.input_path} to {r.output_dir}/best_model.pt (step {r.step:,})")
    print(f"  input:  {_mb(r.input_bytes)}")
    print(
        f"  output: {_mb(r.output_bytes)} = weights {_mb(r.components['model_state_dict'])}, optimizer state "
        f"{_mb(r.components['optimizer_state_dict'])} ({r.optimizer_state}), logs "
        f"{_mb(r.components['training_log'] + r.components['validation_log'])}"
    )
    if r.best_validation_loss is not None:
        print(f"  validation loss on {args.eval_data}: {r.best_validation_loss:.4f}")
    for note in r.notes:
        print(f"  note: {note}")
    return 0


def _add_export(sub: Any) -> None:
    from openllm.interop.export import export_checkpoint

    p = sub.add_parser(
        "export",
        help="write a Hugging Face directory that stock transformers loads, or a GGUF file for llama.cpp",
        description="Export a checkpoint (or a run directory's best model) as a Hugging Face directory (GPT-2, "
        "Llama or Qwen3 by the model's architecture): config.json, model.safetensors, tokenizer files, "
        "generation_config.json and a model card; or, with --format gguf, as OUTPUT_DIR/model.gguf.",
    )
    add_options(p, export_checkpoint)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from openllm.interop.export import export_checkpoint

    r = export_checkpoint(**option_values(args, export_checkpoint))
    print(f"exported to {r.output_dir}: " + ", ".join(f"{k} ({_mb(v)})" for k, v in r.files.items()))
    return 0


def _add_push(sub: Any) -> None:
    from openllm.interop.hub import push_model

    p = sub.add_parser(
        "push",
        help="upload a model to the Hugging Face Hub in one commit (an export, or a run exported first)",
        description="Upload an export directory, or a run directory or checkpoint (exported first; --gguf adds "
        "model.gguf), with its model card and tokenizer, to a Hub repository in one commit. The token is HF_TOKEN "
        "or the one `hf auth login` saved. --dry-run lists the files and checks the name without network.",
    )
    p.add_argument("path", help="export directory, run directory or checkpoint file")
    add_options(p, push_model)
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from openllm.interop.hub import push_model

    push_model(args.path, **option_values(args, push_model))
    return 0


# ------------------------------------------------------------------ inspect / compare / verify


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a checkpoint, run directory or export holds",
        description="Describe a checkpoint, run directory or export. A damaged checkpoint (checksum mismatch, "
        "unknown format version) is still shown, under a first line 'DAMAGED: ...' (in --json, a 'damaged' "
        "list), with exit status 1.",
    )
    p.add_argument("path", help="checkpoint file, run directory, export directory or GGUF file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from openllm.interop.inspect import describe, format_description

    info = describe(args.path, show_damaged=True)
    print(json.dumps(info, indent=2, default=str) if args.json else format_description(info))
    return 1 if info.get("damaged") else 0


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare checkpoints, run directories or exports side by side")
    p.add_argument("paths", nargs="+", help="checkpoint files, run directories, export directories or GGUF files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from openllm.interop.inspect import describe, format_comparison

    infos = [describe(p) for p in args.paths]
    print(json.dumps(infos, indent=2, default=str) if args.json else format_comparison(infos))
    return 0


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check a checkpoint's or an export's integrity (checksum, keys, shapes, loading)",
        description="Verify a checkpoint file, every checkpoint of a run directory, a Hugging Face export "
        "directory (config, weights and tokenizer load and fit; an openllm export holds all its files) or a "
        "GGUF file or export (it reads whole and holds every tensor); exit status 1 and the reason when "
        "anything is wrong. Exports carry no checksum, so changed weight values are not detected there.",
    )
    p.add_argument("path", help="checkpoint file, run directory, export directory or GGUF file")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from openllm.interop.inspect import verify_path

    results = verify_path(args.path)
    for v in results:
        print(f"{'ok  ' if v.ok else 'BAD '} {v.path}" + ("" if v.ok else f": {'; '.join(v.problems)}"))
    return 0 if all(v.ok for v in results) else 1


# ------------------------------------------------------------------------------- eval / plot


def _add_eval(sub: Any) -> None:
    from openllm.inference.evaluate import evaluate_models

    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte on held-out text; a chat model's answers on conversations",
        description="Evaluate one or more models on a text file (or a prepared dataset's validation "
        "split) with sliding windows; several models give one comparison table.",
    )
    add_options(p, evaluate_models)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from openllm.inference.evaluate import evaluate_models

    results = evaluate_models(**option_values(args, evaluate_models))
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    elif args.tasks:
        from openllm.checkpoint.report import task_metrics_text

        for r in results:
            print(r["model"])
            for task, metrics in r["tasks"].items():
                print(f"  {task}: {task_metrics_text(metrics)}")
    elif args.chat_data:
        width = max(len(r["model"]) for r in results)
        print(f"{'model'.ljust(width)}  {'assistant loss':>14}  {'exact match':>11}  {'conversations':>13}")
        for r in results:
            loss, match, n = r["assistant_loss"], r["exact_match"], r["conversations"]
            print(f"{r['model'].ljust(width)}  {loss:14.4f}  {match:11.1%}  {n:>13,}")
    else:
        width = max(len(r["model"]) for r in results)
        print(f"{'model'.ljust(width)}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>10}")
        for r in results:
            print(
                f"{r['model'].ljust(width)}  {r['loss']:8.4f}  {r['perplexity']:10.2f}  {r['bits_per_byte']:9.4f}  "
                f"{r['tokens']:>10,}"
            )
    return 0


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild a run's README.md report (with the evaluations run since)",
        description="Rebuild RUN_DIR/README.md from the run directory's files: data, tokenizer, model, recipe, "
        "wall time, throughput, validation loss and bits per byte, curves, the evaluations `openllm eval` recorded "
        "there, the sample, the machine, library versions and commit. Written automatically as a run ends.",
    )
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--print", action="store_true", help="print the report instead of writing README.md")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from openllm.checkpoint.report import run_report, write_report

    if args.print:
        print(run_report(Path(args.run_dir)))
    else:
        print(f"wrote {write_report(args.run_dir)}")
    return 0


def _add_plot(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="plot a run's training curves",
        description="Training and validation loss against step, learning rate, the best checkpoint and "
        "the stopping point marked. Written automatically at the end of training.",
    )
    p.add_argument("run_dir", help="run directory (its training_log.json and validation_log.json)")
    p.add_argument("--output", help="PNG file (default: RUN_DIR/training_curves.png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from openllm.core.extras import require

    require("matplotlib", "plot", "plotting")
    from openllm.checkpoint.plot import plot_run

    out = plot_run(args.run_dir, args.output)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------- serve


def _add_serve(sub: Any) -> None:
    from openllm.inference.server import ServerLimits, ServerSecurity

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with a web page",
        description="POST /v1/completions and /v1/chat/completions (plain or streamed with server-sent events; "
        "echo, logprobs, token-id prompts, n, seed, stop, penalties, logit bias), GET /v1/models and "
        "/v1/models/NAME, POST /tokenize and /detokenize, GET /health, and a web page at /. Requests are batched "
        "continuously (--max-batch). Binds to 127.0.0.1 unless told otherwise (docs/serving.md).",
    )
    p.add_argument("--model", required=True, help="checkpoint file, run directory or exported directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=f"{one_of(DEVICES)} (default: auto)")
    add_options(p, ServerLimits)
    add_options(p, ServerSecurity)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from openllm.core.extras import require

    require("fastapi", "serve", "serving")
    require("uvicorn", "serve", "serving")
    from openllm.core.device import resolve_device
    from openllm.inference.server import ServerLimits, ServerSecurity, serve

    security = ServerSecurity(**option_values(args, ServerSecurity))
    serve(
        args.model,
        args.host,
        args.port,
        ServerLimits(**option_values(args, ServerLimits)),
        resolve_device(args.device),
        security,
    )
    return 0


# ---------------------------------------------------------------------------------------- main

COMMANDS: dict[str, Callable] = {
    "prepare": _add_prepare,
    "train": _add_train,
    "finetune": _add_finetune,
    "generate": _add_generate,
    "eval": _add_eval,
    "convert": _add_convert,
    "export": _add_export,
    "push": _add_push,
    "inspect": _add_inspect,
    "compare": _add_compare,
    "verify": _add_verify,
    "plot": _add_plot,
    "report": _add_report,
    "serve": _add_serve,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, only that command's options are declared (so `openllm prepare`
    starts without importing what training and inference need, torch among them)."""
    parser = _Parser(prog="openllm", description="Train GPT language models from scratch on your own text.")
    parser.add_argument("--version", action="version", version=f"openllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, add in COMMANDS.items():
        if command is None or name == command:
            add(sub)
            sub.choices[name].add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    return parser


def _with_options_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``openllm CMD --config FILE.yaml ...``: the file's options put before the command line's (which win), so
    every value goes through its own option's parser. ``train`` reads its file itself, as typed values."""
    if parser.prog == "openllm prepare merge":
        return _file_then_command_line(parser, argv)
    if not argv or argv[0] not in COMMANDS or argv[0] == "train":
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [argv[0], *_file_then_command_line(sub.choices[argv[0]], argv[1:])]


def _file_then_command_line(command: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if known.config is None:
        return argv
    return [*options_file_argv(command, known.config, rest), *rest]


def _not_utf8(argv: list[str]) -> str | None:
    """Which argument is not valid UTF-8, in words. Python hands such bytes over as lone surrogates
    (surrogateescape), which no tokenizer, JSON record or text file can hold; they are refused by name here,
    before anything uses them."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            code, at = ord(arg[exc.start]), exc.start
            byte = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            if arg.startswith("--") and "=" in arg[:at]:
                flag = arg.split("=", 1)[0]
                what, at = f"the value of {flag}", at - len(flag) - 1
            elif i and argv[i - 1].startswith("--"):
                what = f"the value of {argv[i - 1]}"
            else:
                what = f"argument {i + 1}"
            return f"{what} is not valid UTF-8 ({byte} at character {at + 1}); command-line text must be UTF-8"
    return None


def command_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of this command line and the arguments it parses: `openllm prepare merge ...` has its own."""
    if argv[:2] == ["prepare", "merge"]:
        return _merge_parser(), argv[2:]
    return build_parser(argv[0] if argv and argv[0] in COMMANDS else None), argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = "prepare merge" if argv[:2] == ["prepare", "merge"] else argv[0] if argv and argv[0] in COMMANDS else ""
    if problem := _not_utf8(argv):
        print(f"openllm{' ' + name if name else ''}: error: {problem}", file=sys.stderr)
        return 2
    parser, argv = command_parser(argv)
    try:
        argv = _with_options_file(parser, argv)
    except OpenLLMError as exc:
        print(f"openllm {name}: error: {exc}", file=sys.stderr)
        return 2
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
        print(
            f"openllm {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set OPENLLM_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
