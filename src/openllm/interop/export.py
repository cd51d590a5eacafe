"""``openllm export``: a Hugging Face GPT-2 directory that stock ``transformers`` loads.

Layout of an export directory::

    config.json              a standard GPT2Config ("model_type": "gpt2"), plus an "openllm" block
    model.safetensors        GPT-2 key names, Conv1D (in, out) weight layout, tied head stored once
    tokenizer.json           the run's tokenizer for `tokenizers` (a SentencePiece BPE converted with the same ids)
    tokenizer_config.json    PreTrainedTokenizerFast with the tokenizer's own special tokens
    special_tokens_map.json
    tokenizer.model          the original SentencePiece model, when the run has one (for OpenLLM itself)
    generation_config.json   the tokenizer's bos / eos / pad ids, max_length at the context
    README.md                model card with the training figures
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openllm import __version__
from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import generation_config, model_card, resolve_checkpoint_path
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import (
    atomic_write_json,
    atomic_write_text,
    commit_directory,
    directory_lock,
    staging_dir,
)
from openllm.core.options import Opt
from openllm.data.tokenizer import Tokenizer, load_tokenizer
from openllm.interop.gpt2 import EXPORT_WEIGHTS, config_to_hf, to_hf
from openllm.interop.tokenizer_json import hf_tokenizer_config, hf_tokenizer_json
from openllm.model.config import ModelConfig


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, int]


def export_checkpoint(
    checkpoint: Annotated[str | os.PathLike, Opt("checkpoint file or run directory")],
    output_dir: Annotated[str | os.PathLike, Opt("directory to write")],
    force: Annotated[bool, Opt("replace a non-empty --output-dir")] = False,
) -> ExportResult:
    """Write a Hugging Face GPT-2 directory for a checkpoint file (or a run directory's best model)."""

    src = resolve_checkpoint_path(checkpoint)
    ckpt = ck.load_checkpoint(src)
    v = ck.verify_checkpoint(src, ckpt)
    if not v.ok:
        raise OpenLLMError(f"cannot export {src}: {'; '.join(v.problems)}")
    info = ck.read_info(ckpt)
    config = ModelConfig.from_dict(ckpt["config"])
    tok = load_tokenizer(src.parent)
    if tok.vocab_size != config.vocab_size:
        raise OpenLLMError(
            f"the tokenizer in {src.parent} has {tok.vocab_size} tokens, the model's embedding {config.vocab_size}"
        )
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OpenLLMError(f"output directory {out} is not empty; choose another or pass --force")
    stats = info.training_stats
    extra = {
        "source_checkpoint": str(src),
        "step": info.step,
        "best_validation_loss": info.best_validation_loss,
        "tokenizer_sha256": tok.sha256,
        "dataset_fingerprint": info.dataset_fingerprint,
        "provenance": info.provenance,
        "training_stats": stats,
    }
    with directory_lock(out, "export directory"):
        staging = staging_dir(out)
        _write_export(staging, ckpt, src, config, tok, info, extra)
        commit_directory(staging, out)
    return ExportResult(out, {p.name: p.stat().st_size for p in sorted(out.iterdir())})


def _write_export(
    staging: Path,
    ckpt: dict,
    src: Path,
    config: ModelConfig,
    tok: Tokenizer,
    info: ck.CheckpointInfo,
    extra: dict,
) -> None:
    from safetensors.torch import save_file

    try:
        save_file(
            to_hf(ckpt["model_state_dict"], config),
            str(staging / EXPORT_WEIGHTS),
            metadata={"format": "pt", "openllm_version": __version__},
        )
        atomic_write_json(staging / "config.json", config_to_hf(config, tok.special, extra))
        tok.save(staging, model_max_length=config.block_size)  # its own files (tokenizer.model for SentencePiece)
        atomic_write_text(staging / "tokenizer.json", hf_tokenizer_json(tok))
        tok_config = hf_tokenizer_config(tok, config.block_size)
        atomic_write_json(staging / "tokenizer_config.json", tok_config)
        atomic_write_json(
            staging / "special_tokens_map.json", {k: v for k, v in tok_config.items() if k.endswith("_token")}
        )
        atomic_write_json(
            staging / "generation_config.json",
            {**generation_config(config.block_size, tok.special), "transformers_version": "4.40.0"},
        )
        model_info = dict(ckpt.get("model_info") or {})
        model_info.setdefault(
            "parameters", sum(t.numel() for k, t in ckpt["model_state_dict"].items() if k != "lm_head.weight")
        )
        model_info.setdefault("vocab_size", config.vocab_size)
        model_info.setdefault("context", config.block_size)
        atomic_write_text(
            staging / "README.md",
            model_card(
                "OpenLLM model (Hugging Face export)",
                model_info,
                info.training_stats,
                info.training_config,
                info.provenance.get("source", "trained with openllm"),
            )
            + "\nLoad with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.\n",
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
