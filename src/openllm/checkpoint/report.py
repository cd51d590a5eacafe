"""A run's report: its ``README.md``, the model card extended with everything the run directory knows.

It is built from the run directory's files alone (the newest checkpoint's records, ``validation_log.json``,
``metrics.jsonl``, the dataset's ``meta.json``, ``environment.json``, ``evaluations.jsonl``, ``sample.txt`` and
the curves), so a run writes it as it ends and ``openllm report RUN_DIR`` rebuilds it at any time, with the
evaluations run since. A file that is missing or unreadable leaves its section saying so; it never stops the
report.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import BEST, FINAL, step_checkpoints
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_write_text
from openllm.core.untrusted import read_json

ENVIRONMENT = "environment.json"  # the machine, libraries and commit of the run's last start
EVALUATIONS = "evaluations.jsonl"  # one line per `openllm eval` of the run's checkpoints
SAMPLE = "sample.txt"  # the text `openllm train` printed from best_model.pt as it ended
CURVES = "training_curves.png"
REPORT = "README.md"


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "training_config.json").is_file()


def run_dir_of(model_path: str | os.PathLike) -> Path | None:
    """The run directory a model path is, or holds the checkpoint of; None for anything else (an export)."""
    p = Path(model_path)
    if is_run_dir(p):
        return p
    if p.is_file() and is_run_dir(p.parent):
        return p.parent
    return None


def record_evaluation(run_dir: Path, record: dict) -> None:
    """Add an evaluation's results to ``evaluations.jsonl`` (rewritten whole, atomically)."""
    path = run_dir / EVALUATIONS
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    stamped = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **record}
    atomic_write_text(path, old + json.dumps(stamped) + "\n")


def write_report(run_dir: str | os.PathLike, info: ck.CheckpointView | None = None) -> Path:
    """(Re)write ``RUN_DIR/README.md`` from the run directory's files (``info``: the newest checkpoint's records,
    when the caller has them in memory: a run as it ends)."""
    run_dir = Path(run_dir)
    text = run_report(run_dir, info)
    atomic_write_text(run_dir / REPORT, text)
    return run_dir / REPORT


def run_report(run_dir: Path, info: ck.CheckpointView | None = None) -> str:
    if not is_run_dir(run_dir):
        raise OpenLLMError(f"{run_dir} is not a run directory (it has no training_config.json)")
    info = info or _newest_info(run_dir)
    if info is None:
        raise OpenLLMError(f"{run_dir} holds no checkpoint that can be read")
    tcfg, stats, model = info.training_config, info.training_stats, info.model_info
    meta, chats = _dataset_records(run_dir, tcfg)
    env = _read(run_dir / ENVIRONMENT)
    validation = [v for v in info.validation_log if isinstance(v, dict)]
    bytes_per_token = _bytes_per_token(meta)
    base = tcfg.get("base_model")
    title = f"OpenLLM model fine-tuned from {base}" if base else f"OpenLLM {model.get('model_size') or ''} model"
    out = [f"# {title}".replace("  ", " "), ""]
    out += [
        "A language model trained with OpenLLM. Every figure below was measured during this run; "
        "`openllm report` rebuilds this file from the run directory.",
        "",
    ]
    out += _section(
        "Model",
        [
            f"architecture: {model.get('architecture', '?')}",
            f"parameters: {_n(model.get('parameters'))}; training FLOPs per token: {_n(model.get('flops_per_token'))}",
            f"vocabulary: {model.get('tokenizer') or _n(model.get('vocab_size')) + ' tokens'}; "
            f"context {_n(model.get('context'))}",
            f"provenance: {info.source}",
        ],
    )
    if info.data_mixture:
        out += _section("Data", _mixture_lines(info.data_mixture))
    else:
        out += _section("Data", _chat_lines(chats, tcfg) if chats else _data_lines(meta, tcfg))
    out += _section(
        "Recipe",
        [
            f"optimizer {tcfg.get('optimizer')}, learning rate {_g(tcfg.get('learning_rate'))} -> "
            f"{_g(tcfg.get('min_lr'))} "
            f"({tcfg.get('lr_schedule')} schedule, warmup steps: {tcfg.get('warmup_steps')}), weight decay "
            f"{tcfg.get('weight_decay')}, gradient clip {tcfg.get('grad_clip')}",
            f"batch {tcfg.get('batch_size')} x {tcfg.get('seq_len')} tokens x "
            f"{tcfg.get('gradient_accumulation_steps')} accumulation x {tcfg.get('world_size', 1)} process(es) = "
            f"{'at most ' if chats else ''}{_n(tcfg.get('tokens_per_step'))} tokens per step"
            + (" (a row per conversation, padded to the longest of its micro-batch)" if chats else ""),
            f"precision {tcfg.get('autocast_dtype')} on {tcfg.get('device_type')}; dropout {tcfg.get('dropout')}; "
            f"seed {tcfg.get('seed')}",
        ],
    )
    throughput, mfu = _throughput(run_dir)
    out += _section(
        "Training",
        [
            f"steps: {_n(stats.get('total_steps'))}; tokens seen: {_n(stats.get('tokens_seen'))}; epochs: "
            f"{_f(stats.get('epochs'), 2)}; stopped because: {stats.get('stop_reason') or 'still running'}",
            f"wall time: {_f(stats.get('elapsed_seconds'), 1)} s; {_n(_int(stats.get('average_tokens_per_second')))} "
            f"tokens/s on average ({throughput}); model FLOPs utilisation: {mfu}",
            f"resumed from: {', '.join(map(str, stats.get('resumed_from') or [])) or 'never resumed'}; skipped "
            f"(non-finite) steps: {_n(stats.get('skipped_steps'))}",
        ],
    )
    best, last = stats.get("best_validation_loss"), (validation[-1].get("validation_loss") if validation else None)
    last_step = _n(validation[-1].get("step") if validation else None)
    if chats:  # a fine-tune: the loss on the assistant's tokens of the validation conversations
        results = [
            f"best validation loss (on what the assistant says): {_f(best)} at step {_n(stats.get('best_step'))} "
            "(best_model.pt)",
            f"final validation loss: {_f(last)} at step {last_step}",
        ]
    elif info.data_mixture:
        results = [
            f"best validation loss (the datasets' losses weighted as the mixture): {_f(best)} at step "
            f"{_n(stats.get('best_step'))} (best_model.pt); final: {_f(last)} at step {last_step}",
            *_mixture_results(info.data_mixture, validation[-1] if validation else {}),
        ]
    else:
        results = [
            f"best validation loss: {_f(best)} at step {_n(stats.get('best_step'))} (best_model.pt); "
            f"bits per byte {_f(_bpb(best, bytes_per_token))}",
            f"final validation loss: {_f(last)} at step {last_step}; bits per byte {_f(_bpb(last, bytes_per_token))}",
            "bits per byte use the validation split's "
            + (f"{1 / bytes_per_token:.4f} tokens per byte" if bytes_per_token else "tokens per byte (not recorded)"),
        ]
    out += _section("Results", results)
    if (run_dir / CURVES).is_file():
        out += ["## Curves", "", f"![training curves]({CURVES})", ""]
    out += ["## Evaluations", "", *_evaluation_lines(run_dir), ""]
    sample = (run_dir / SAMPLE).read_text(encoding="utf-8", errors="replace") if (run_dir / SAMPLE).is_file() else ""
    out += ["## Sample", ""]
    out += (
        ["From best_model.pt, as the run ended:", "", "```text", sample.rstrip("\n"), "```", ""]
        if sample
        else [
            "No sample.txt in the run directory (`--sample-tokens 0`, a fine-tune, a run that did not end through "
            "`openllm train`, or one older than the report).",
            "",
        ]
    )
    out += _section("Machine and software", _environment_lines(env, info.library_versions))
    out += [
        "## Use",
        "",
        "```bash",
        *(
            [
                "openllm serve --model .                          # /v1/chat/completions and the page's chat mode",
                "openllm eval --model . --chat-data held_out.jsonl  # recorded here; `openllm report .` adds it above",
            ]
            if chats
            else [
                'openllm generate --model . --prompt "Once upon a time"',
                "openllm eval --model . --data held_out.txt      # recorded here; `openllm report .` adds it above",
            ]
        ),
        "openllm export --checkpoint best_model.pt --output-dir ../hf   # outside the run directory",
        "```",
        "",
    ]
    return "\n".join(out)


def _dataset_records(run_dir: Path, tcfg: dict) -> tuple[dict | None, dict | None]:
    """The run's dataset ``meta.json`` (text) or ``conversations.json`` (a fine-tune), as far as they are there."""
    if not tcfg.get("dataset_dir"):
        return None, None
    dataset = Path(str(tcfg.get("dataset_dir")))
    if not dataset.is_dir() and (run_dir / "dataset").is_dir():  # prepared on the fly, the run moved since
        dataset = run_dir / "dataset"
    meta = _read(dataset / "meta.json")
    return meta, (_read(dataset / "conversations.json") if meta is None else None)


def run_results(run_dir: Path, info: ck.CheckpointView) -> dict[str, float | int | None]:
    """The report's headline figures, for trackers: steps, tokens, time, best and final validation loss and
    (text runs) their bits per byte."""
    stats = info.training_stats
    meta, _ = _dataset_records(run_dir, info.training_config)
    validation = [v for v in info.validation_log if isinstance(v, dict)]
    best, last = stats.get("best_validation_loss"), (validation[-1].get("validation_loss") if validation else None)
    per_token = _bytes_per_token(meta)
    return {
        "steps": stats.get("total_steps"),
        "tokens_seen": stats.get("tokens_seen"),
        "elapsed_seconds": stats.get("elapsed_seconds"),
        "average_tokens_per_second": stats.get("average_tokens_per_second"),
        "best_step": stats.get("best_step"),
        "best_validation_loss": best,
        "final_validation_loss": last,
        "best_bits_per_byte": _bpb(best, per_token),
        "final_bits_per_byte": _bpb(last, per_token),
    }


def _section(title: str, items: list[str]) -> list[str]:
    return [f"## {title}", "", *(f"- {item}" for item in items), ""]


def _newest_info(run_dir: Path) -> ck.CheckpointView | None:
    """The records of the run's newest checkpoint: final_model.pt, else the newest step checkpoint, else the best
    (each read once; one that does not read is passed over)."""
    steps = [path for _, path in reversed(step_checkpoints(run_dir))]
    for path in [run_dir / FINAL, *steps, run_dir / BEST]:
        if not path.exists():
            continue
        try:
            return ck.read_info(ck.load_checkpoint(path, mmap=True))
        except OpenLLMError:
            continue
    return None


def _read(path: Path) -> dict | None:
    try:
        value = read_json(path, path.name) if path.is_file() else None
    except OpenLLMError:
        return None
    return value if isinstance(value, dict) else None


def _data_lines(meta: dict | None, tcfg: dict) -> list[str]:
    if meta is None:
        return [f"dataset: {tcfg.get('dataset_dir')} (its meta.json is not there any more)"]
    inputs = meta.get("inputs") or []
    names = ", ".join(str(i.get("path")) for i in inputs[:5] if isinstance(i, dict))
    names += " ..." if len(inputs) > 5 else ""
    lines = [
        f"dataset: {tcfg.get('dataset_dir')}; inputs: {names or 'not recorded'}",
        f"documents: {_n(meta.get('documents_read'))} read, {_n(meta.get('duplicates_dropped'))} duplicates dropped, "
        f"{_n(meta.get('train_documents'))} training / {_n(meta.get('val_documents'))} validation",
        f"tokens: {_n(meta.get('train_tokens'))} training / {_n(meta.get('val_tokens'))} validation; split: "
        f"{meta.get('split')}",
        f"tokenizer: {meta.get('tokenizer')} ({meta.get('tokenizer_source')})",
    ]
    filtered, limits = meta.get("filtered_documents") or {}, meta.get("quality_filters") or {}
    if filtered:
        lines.append(
            "quality filters: "
            + ", ".join(f"--{k.replace('_', '-')} {limits.get(k)} dropped {_n(v)}" for k, v in filtered.items())
        )
    if isinstance(meta.get("near_dedup"), dict):
        near = meta["near_dedup"]
        lines.append(
            f"near-duplicates: {_n(meta.get('near_duplicates_dropped'))} dropped (MinHash, threshold "
            f"{near.get('threshold')}, {near.get('bands')} bands of {near.get('rows')}, {near.get('shingle')}-word "
            "shingles)"
        )
    return lines


def _mixture_lines(mixture: dict) -> list[str]:
    """A mixture's datasets: each one's weight and tokens supplied, then its own data lines."""
    parts = [d for d in mixture.get("datasets") or [] if isinstance(d, dict)]
    seen = mixture.get("tokens_seen") or {}
    lines = [
        f"a mixture of {len(parts)} datasets (weight, training tokens supplied): "
        + "; ".join(f"{d.get('name')} {_g(d.get('weight'))}, {_n(seen.get(d.get('name')))}" for d in parts)
    ]
    for d in parts:
        meta = _read(Path(str(d.get("path"))) / "meta.json")
        lines += [f"{d.get('name')}: {line}" for line in _data_lines(meta, {"dataset_dir": d.get("path")})]
    return lines


def _mixture_results(mixture: dict, last: dict) -> list[str]:
    """Each dataset's final validation loss and bits per byte (with its own split's tokens per byte)."""
    losses = last.get("validation_loss_by_dataset") or {}
    lines = []
    for d in (d for d in mixture.get("datasets") or [] if isinstance(d, dict)):
        name = d.get("name")
        per_token, loss = _bytes_per_token(_read(Path(str(d.get("path"))) / "meta.json")), losses.get(name)
        lines.append(f"{name}: final validation loss {_f(loss)}; bits per byte {_f(_bpb(loss, per_token))}")
    return lines


def _chat_lines(chats: dict, tcfg: dict) -> list[str]:
    """A fine-tune's conversations (``openllm finetune``'s encoded set)."""
    inputs = ", ".join(str(i.get("path")) for i in chats.get("inputs") or [] if isinstance(i, dict))
    return [
        f"fine-tuned from {tcfg.get('base_model')} on conversations: {inputs or 'not recorded'}",
        f"conversations: {_n(chats.get('records_read'))} read, {_n(chats.get('duplicates_dropped'))} duplicates "
        f"dropped, {_n(chats.get('train_conversations'))} training / {_n(chats.get('val_conversations'))} validation; "
        f"{_n(chats.get('truncated'))} truncated, {_n(chats.get('dropped_too_long'))} too long",
        f"tokens: {_n(chats.get('train_tokens'))} training, of which {_n(chats.get('train_loss_tokens'))} carry loss "
        f"(--train-on {chats.get('train_on')}); split: {chats.get('split')}",
        f"tokenizer: {chats.get('tokenizer')}",
    ]


def _throughput(run_dir: Path) -> tuple[str, str]:
    """The median tokens/s of the logged steps and the mean MFU where it was measured."""
    rates, mfus = [], []
    for r in _json_lines(run_dir / "metrics.jsonl"):
        if isinstance(r.get("tokens_per_second"), (int, float)):
            rates.append(float(r["tokens_per_second"]))
        if isinstance(r.get("mfu"), (int, float)) and math.isfinite(r["mfu"]):
            mfus.append(float(r["mfu"]))
    rate = f"median of the logged steps {sorted(rates)[len(rates) // 2]:,.0f}" if rates else "no metrics.jsonl"
    mfu = f"{sum(mfus) / len(mfus):.1%} on average" if mfus else "not measured (no known peak FLOP/s: a CPU)"
    return rate, mfu


def _json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, none for a missing file (a line that is not one is passed over)."""
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            records.append(r)
    return records


def _bytes_per_token(meta: dict | None) -> float | None:
    if not meta:
        return None
    tokens, text = meta.get("val_tokens"), meta.get("val_text_bytes")
    ok = isinstance(tokens, int) and isinstance(text, int) and tokens > 0 and text > 0
    return text / tokens if ok else None  # type: ignore[operator]


def _bpb(loss, bytes_per_token: float | None) -> float | None:
    if not isinstance(loss, (int, float)) or not math.isfinite(loss) or not bytes_per_token:
        return None
    return loss / math.log(2) / bytes_per_token


def _evaluation_lines(run_dir: Path) -> list[str]:
    records = [r for r in _json_lines(run_dir / EVALUATIONS) if isinstance(r.get("results"), dict)]
    if not records:
        return ["None yet: `openllm eval --model RUN_DIR ...` records its results here."]
    lines = ["| when | checkpoint | data | results |", "| --- | --- | --- | --- |"]
    for r in records:
        res = r["results"]
        if isinstance(res.get("tasks"), dict):  # lm-evaluation-harness tasks (`openllm eval --tasks`)
            shown = "; ".join(
                f"{task}: {task_metrics_text(m)}" for task, m in res["tasks"].items() if isinstance(m, dict)
            )
            settings = {k: v for k, v in (res.get("settings") or {}).items() if v is not None}
            shown += f" ({', '.join(f'{k} {v}' for k, v in settings.items())})" if settings else ""
        elif "exact_match" in res:
            shown = f"assistant loss {_f(res.get('assistant_loss'))}, exact match {_pct(res.get('exact_match'))} of "
            shown += f"{_n(res.get('conversations'))} conversations"
        else:
            shown = f"loss {_f(res.get('loss'))}, perplexity {_f(res.get('perplexity'), 2)}, bits per byte "
            shown += f"{_f(res.get('bits_per_byte'))} over {_n(res.get('tokens'))} tokens"
        where = f"{r.get('checkpoint')} (step {_n(r.get('step'))})"
        shown += " (on training data: --allow-training-data)" if r.get("training_data") else ""
        data = r.get("data") if "data" in r else f"harness tasks {r.get('tasks')}"
        lines.append(f"| {r.get('time')} | {where} | {data} | {shown} |")
    return lines


def task_metrics_text(metrics: dict) -> str:
    """``acc 0.6000 +- 0.2449, acc_norm ... (5-shot)``: a harness task's metrics, their standard errors, shots."""
    parts = []
    for name, value in metrics.items():
        if name.endswith("_stderr") or name == "n_shot" or not isinstance(value, (int, float)):
            continue
        err = metrics.get(f"{name}_stderr")
        parts.append(f"{name} {_f(value)}" + (f" +- {_f(err)}" if isinstance(err, (int, float)) else ""))
    shots = f" ({metrics['n_shot']}-shot)" if isinstance(metrics.get("n_shot"), int) else ""
    return (", ".join(parts) or "no metrics") + shots


def _environment_lines(env: dict | None, versions: dict | None) -> list[str]:
    libraries = (env or {}).get("libraries") or versions or {}
    lines = []
    if env:
        gpus = env.get("gpus") or []
        lines.append(f"processor: {env.get('cpu')}, {env.get('cpu_count')} cores usable; {env.get('platform')}")
        lines.append(
            "GPUs: "
            + (f"{len(gpus)} x {gpus[0]} (CUDA {env.get('cuda')})" if gpus else "none")
            + ("" if len(set(gpus)) <= 1 else f" ({', '.join(gpus)})")
        )
        commit = env.get("commit")
        lines.append(
            f"OpenLLM commit: {commit}{' (with uncommitted changes)' if env.get('dirty') else ''}"
            if commit
            else "OpenLLM commit: not run from a git checkout"
        )
    else:
        lines.append("machine: not recorded (the run predates environment.json)")
    lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in libraries.items()) if libraries else "libraries: ?")
    return lines


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "?" if x is None else str(x)


def _f(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "?"


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) and math.isfinite(x) else "?"


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else _n(x)


def _int(x):
    return round(x) if isinstance(x, (int, float)) and math.isfinite(x) else None
