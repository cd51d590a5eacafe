"""``openllm export``: a Hugging Face directory that stock ``transformers`` loads, or a GGUF file.

Layout of an export directory (``--format hf``)::

    config.json              a standard GPT2Config ("model_type": "gpt2"), LlamaConfig ("llama") or, for a
                             Llama model with QK-norm, Qwen3Config ("qwen3"); plus an "openllm" block
    model.safetensors        the family's key names (GPT-2: Conv1D (in, out) layout), a tied head stored once
    tokenizer.json           the run's tokenizer for `tokenizers` (a SentencePiece BPE converted with the same ids)
    tokenizer_config.json    PreTrainedTokenizerFast with the tokenizer's own special tokens
    special_tokens_map.json
    tokenizer.model          the original SentencePiece model, when the run has one (for OpenLLM itself)
    generation_config.json   the tokenizer's bos / eos / pad ids, max_length at the context
    README.md                model card with the training figures

``--format gguf`` writes ``model.gguf`` (see :mod:`openllm.interop.gguf_file`) and the model card.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from openllm import __version__
from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import generation_config, model_card, resolve_checkpoint_path
from openllm.core.errors import OpenLLMError
from openllm.core.extras import require
from openllm.core.fileio import OutputDir, atomic_write_json, atomic_write_text, ordinary_file_mode
from openllm.core.options import Opt
from openllm.data.tokenizer import CONFIG_FILE, Tokenizer, load_tokenizer
from openllm.data.tokenizer.base import TOKENIZER_FILES
from openllm.interop.gguf_file import GGUF_DTYPES, check_exportable, write_gguf
from openllm.interop.gpt2 import EXPORT_WEIGHTS
from openllm.interop.hf import config_to_hf, to_hf
from openllm.interop.merged import plain_state
from openllm.interop.tokenizer_json import hf_tokenizer_config, hf_tokenizer_json
from openllm.model.config import ModelConfig

FORMATS = ("hf", "gguf")
GGUF_FILE = "model.gguf"
# What every Hugging Face export holds (`openllm verify` checks them), and everything either format writes:
# --force replaces a directory holding nothing else (an earlier export).
HF_FILES = (
    "config.json",
    EXPORT_WEIGHTS,
    "tokenizer.json",
    CONFIG_FILE,
    "special_tokens_map.json",
    "generation_config.json",
    "README.md",
)
EXPORT_FILES = (*HF_FILES, *TOKENIZER_FILES, GGUF_FILE)


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, int]


def export_checkpoint(
    checkpoint: Annotated[str | os.PathLike, Opt("checkpoint file or run directory")],
    output_dir: Annotated[str | os.PathLike, Opt("directory to write")],
    force: Annotated[
        bool,
        Opt(
            "replace an earlier export in --output-dir (a training run, the input or other files there are "
            "refused, with or without it)"
        ),
    ] = False,
    format: Annotated[
        str, Opt("hf: a Hugging Face directory; gguf: OUTPUT_DIR/model.gguf for llama.cpp", choices=FORMATS)
    ] = "hf",
    gguf_dtype: Annotated[str, Opt("weight type of a GGUF file", choices=GGUF_DTYPES)] = "f16",
) -> ExportResult:
    """Write a Hugging Face directory (or a GGUF file) for a checkpoint file (or a run directory's best model)."""
    if format not in FORMATS:
        raise OpenLLMError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if gguf_dtype not in GGUF_DTYPES:
        raise OpenLLMError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, got {gguf_dtype!r}")
    if gguf_dtype != "f16" and format != "gguf":
        raise OpenLLMError("--gguf-dtype applies to --format gguf only")
    if format == "gguf":
        require("gguf", "gguf", "--format gguf")  # before anything is read or written

    src = resolve_checkpoint_path(checkpoint)
    ckpt = ck.load_verified(src, "export")
    info = ck.read_info(ckpt)
    lora = info.lora
    # the checkpoint, its run directory (the tokenizer is read there) and a LoRA checkpoint's base are inputs the
    # output must not touch
    bases = (lora.base_path, lora.base_path.parent) if lora else ()
    reads = (Path(checkpoint), src, src.parent, *bases)
    out = OutputDir(Path(output_dir), "export", EXPORT_FILES, reads=reads, force=force)
    out.check()
    state = plain_state(ckpt, str(src))  # a LoRA checkpoint's adapters merged into its base: plain weights
    config = ModelConfig.from_dict(info.model_config or {})
    tok = load_tokenizer(src.parent)
    if tok.vocab_size != config.vocab_size:
        raise OpenLLMError(
            f"the tokenizer in {src.parent} has {tok.vocab_size} tokens, the model's embedding {config.vocab_size}"
        )
    if format == "gguf":
        check_exportable(config, tok)
    stats = info.training_stats
    extra = {
        "source_checkpoint": str(src),
        "step": info.step,
        "best_validation_loss": info.best_validation_loss,
        "tokenizer_sha256": tok.sha256,
        "dataset_fingerprint": info.dataset_fingerprint,
        "provenance": info.provenance,
        "training_stats": stats,
        **({"lora_merged": {**lora.config.to_dict(), "base": str(lora.base_path)}} if lora else {}),
    }
    with out.replacing("export directory") as staging:
        if format == "gguf":
            _write_gguf(staging, state, config, tok, info, gguf_dtype)
        else:
            _write_export(staging, state, config, tok, info, extra)
    return ExportResult(out.path, {p.name: p.stat().st_size for p in sorted(out.path.iterdir())})


def _write_gguf(
    staging: Path, state: dict, config: ModelConfig, tok: Tokenizer, info: ck.CheckpointInfo, dtype: str
) -> None:
    # (here and in _write_export, a failure leaves cleaning up to OutputDir.replacing, which first reads a full
    # disk as full: removing the staging directory here first would free the space it lacked)
    write_gguf(staging / GGUF_FILE, state, config, tok, dtype, name="openllm")
    atomic_write_text(
        staging / "README.md",
        _card(state, config, info, "OpenLLM model (GGUF export)", [f'llama-cli -m {GGUF_FILE} -p "Once upon a time"']),
    )


def _card(state: dict, config: ModelConfig, info: ck.CheckpointInfo, title: str, use: list[str] | None = None) -> str:
    model_info = dict(info.model_info)
    model_info.setdefault("parameters", sum(t.numel() for k, t in state.items() if k != "lm_head.weight"))
    model_info.setdefault("vocab_size", config.vocab_size)
    model_info.setdefault("context", config.block_size)
    return model_card(
        title,
        model_info,
        info.training_stats,
        info.training_config,
        info.provenance.get("source", "trained with openllm"),
        use
        or [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model, tokenizer = AutoModelForCausalLM.from_pretrained("."), AutoTokenizer.from_pretrained(".")',
            'ids = tokenizer("Once upon a time", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))",
        ],
    )


def _write_export(
    staging: Path,
    state: dict,
    config: ModelConfig,
    tok: Tokenizer,
    info: ck.CheckpointInfo,
    extra: dict,
) -> None:
    from safetensors.torch import save_file

    save_file(
        to_hf(state, config),
        str(staging / EXPORT_WEIGHTS),
        metadata={"format": "pt", "openllm_version": __version__},
    )
    ordinary_file_mode(staging / EXPORT_WEIGHTS)  # safetensors creates it 0600, unlike every file beside it
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
        generation_config(config.block_size, tok.special),  # no transformers_version: none wrote it
    )
    atomic_write_text(
        staging / "README.md",
        _card(state, config, info, "OpenLLM model (Hugging Face export)")
        + "\nLoad with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.\n",
    )
