"""The run directory: its file names, the files beside the checkpoints, and finding checkpoints in it.

Layout::

    best_model.pt  final_model.pt  checkpoint_step_N.pt   full checkpoints (format: openllm.checkpoint.format)
    checkpoint_step_N/                                    a step checkpoint of an --fsdp run: one directory of
                                                          every process's shards (format.save_sharded_checkpoint)
    config.json  training_config.json  generation_config.json
    tokenizer.model  tokenizer_config.json
    training_log.json  validation_log.json  metrics.jsonl
    README.md (model card)  training_curves.png  dataset/ (when trained from --data-file)
    provenance.json (converted runs)
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from openllm import __version__
from openllm.checkpoint.format import is_sharded_checkpoint, load_checkpoint, read_info, verify_checkpoint
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import atomic_write_json, atomic_write_text
from openllm.core.numbers import finite_or_none
from openllm.data.tokenizer import SpecialTokens

BEST, FINAL = "best_model.pt", "final_model.pt"
_STEP_FILE = re.compile(r"^checkpoint_step_(\d+)(\.pt)?$")


def step_file(step: int, sharded: bool = False) -> str:
    """The name of the step checkpoint of ``step``: a file, or (``sharded``) a directory of shards."""
    return f"checkpoint_step_{step}" if sharded else f"checkpoint_step_{step}.pt"


def generation_config(max_length: int, special: SpecialTokens) -> dict:
    """Sampling defaults for the run and its export. Only ``max_length`` (prompt + new tokens) bounds the
    length, at the model's context, so a default `transformers` generation never runs past the positions.
    The token ids are the tokenizer's own (null where its vocabulary has no such token)."""
    return {
        "max_length": max_length,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "do_sample": True,
        **special.as_config_ids(),
    }


def model_config_json(config: dict, extra: dict | None = None) -> dict:
    return {
        "architectures": ["GPT"],
        "model_type": "openllm-gpt",
        **config,
        "openllm_version": __version__,
        **(extra or {}),
    }


def write_logs(run_dir: Path, training_log: list, validation_log: list) -> None:
    atomic_write_json(run_dir / "training_log.json", training_log)
    atomic_write_json(run_dir / "validation_log.json", validation_log)


def _fmt(x, digits=4) -> str:
    if finite_or_none(x) is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def model_card(title: str, info: dict, stats: dict, tcfg: dict, provenance: str, use: list[str] | None = None) -> str:
    """A model card: what the model is and how it was trained (an export's, or a converted run's). ``use``: the
    lines of its "Use" code block (default: the openllm commands for a run directory)."""
    best = finite_or_none(stats.get("best_validation_loss"))
    lr = tcfg.get("learning_rate")
    min_lr = tcfg.get("min_lr")
    lines = [
        f"# {title}",
        "",
        "A language model trained with OpenLLM. Every figure below was measured during its training.",
        "",
        "## Model",
        "",
        f"- architecture: {info.get('architecture', 'GPT-2')}",
        f"- parameters: {_fmt(info.get('parameters'))}",
        f"- vocabulary: {info.get('tokenizer') or _fmt(info.get('vocab_size')) + ' tokens'}; "
        f"context {_fmt(info.get('context'))}",
        "",
        "## Training",
        "",
        f"- provenance: {provenance}",
        f"- steps: {_fmt(stats.get('total_steps'))}; tokens seen: {_fmt(stats.get('tokens_seen'))}; "
        f"epochs: {_fmt(stats.get('epochs'), 2)}",
        f"- best validation loss: {_fmt(best)} at step {_fmt(stats.get('best_step'))} "
        f"(perplexity {_fmt(math.exp(best) if best is not None else None, 2)})",
        f"- last training loss: {_fmt(stats.get('last_training_loss'))}",
        f"- skipped (non-finite) steps: {_fmt(stats.get('skipped_steps'))}",
        f"- wall time: {_fmt(stats.get('elapsed_seconds'), 1)} s; average throughput "
        f"{_fmt(stats.get('average_tokens_per_second'), 0)} tokens/s on {stats.get('device')}",
        f"- stopped because: {stats.get('stop_reason') or 'not recorded (a checkpoint saved during the run)'}",
        f"- batch {tcfg.get('batch_size')} x {tcfg.get('seq_len')} tokens x {tcfg.get('gradient_accumulation_steps')} "
        f"accumulation x {tcfg.get('world_size', 1)} process(es); learning rate "
        f"{f'{lr:.3g}' if isinstance(lr, float) else lr} -> {f'{min_lr:.3g}' if isinstance(min_lr, float) else min_lr} "
        f"(warmup steps: {tcfg.get('warmup_steps')}), weight decay {tcfg.get('weight_decay')}",
        "",
        "## Use",
        "",
        "```" + ("python" if use and use[0].startswith(("from", "import")) else "bash"),
        *(
            use
            or [
                'openllm generate --model . --prompt "Once upon a time"',
                "openllm export --checkpoint best_model.pt --output-dir ../hf   # outside the run directory",
            ]
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, title: str, info: dict, stats: dict, tcfg: dict, provenance: str) -> None:
    atomic_write_text(run_dir / "README.md", model_card(title, info, stats, tcfg, provenance))


def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``checkpoint_step_N.pt`` files and ``checkpoint_step_N/`` sharded checkpoints of a run directory, oldest
    first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in run_dir.iterdir()
        if (m := _STEP_FILE.match(p.name)) and (p.is_file() if m.group(2) else is_sharded_checkpoint(p))
    ]
    return sorted(found)


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Files ``--resume auto`` may use, newest training state first."""
    run_dir = Path(run_dir)
    ranked: list[tuple[int, int, Path]] = [(step, 1, p) for step, p in step_checkpoints(run_dir)]
    for name, rank in ((FINAL, 2), (BEST, 0)):
        p = run_dir / name
        if p.is_file():
            try:
                recorded = read_info(load_checkpoint(p, mmap=True)).step
            except OpenLLMError:
                recorded = None
            step = -1 if recorded is None else recorded
            ranked.append((step, rank, p))
    return [p for _, _, p in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def find_resumable(run_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``run_dir`` that verifies; older ones are tried with a warning."""
    for path in resume_candidates(run_dir):
        v = verify_checkpoint(path, keep=True)
        if v.checkpoint is not None:
            return path, v.checkpoint
        warn(f"warning: skipping {path.name}: {'; '.join(v.problems)}")
    return None


def rotate(run_dir: str | os.PathLike, keep_last: int, protect: Iterable[Path | None] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints, never one in ``protect``."""
    keep = {Path(p).resolve() for p in protect if p}
    files = step_checkpoints(run_dir)
    removed = []
    for _, p in files[: max(0, len(files) - keep_last)]:
        if p.resolve() not in keep:
            if p.is_dir():  # renamed aside first: a kill while deleting leaves a temporary name, never a torn step
                aside = p.with_name(f".{p.name}.tmp-deleting-{os.getpid()}")
                os.replace(p, aside)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory means its best_model.pt (else final_model.pt, else its newest step checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise OpenLLMError(f"model not found: {path}")
    if path.is_file() or is_sharded_checkpoint(path):
        return path
    for name in (BEST, FINAL):
        if (path / name).is_file():
            return path / name
    steps = step_checkpoints(path)
    if steps:
        return steps[-1][1]
    raise OpenLLMError(
        f"{path} holds no checkpoint (best_model.pt, final_model.pt, checkpoint_step_N.pt or checkpoint_step_N/)"
    )
