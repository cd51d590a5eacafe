"""Import raw weights into a full OpenLLM run directory, detecting the input kind:

1. ``legacy``   a legacy OpenLLM export (pytorch_model.bin with mask buffers, "model_type": "gpt")
2. ``hf-gpt2``  a Hugging Face GPT-2 directory (Conv1D layout, safetensors or pytorch_model.bin)
3. ``nanogpt``  a nanoGPT ckpt.pt (``_orig_mod.`` prefixes from torch.compile are removed)
4. ``openllm-export``  a directory written by ``openllm export``
5. ``openllm-sharded``  a sharded step checkpoint (``checkpoint_step_N/``) of an ``--fsdp`` run, gathered whole

Everything is loaded with ``weights_only=True`` or safetensors. The output's ``best_model.pt``
is a complete checkpoint that ``openllm train --resume`` continues from. It keeps what the source
says: its tokenizer (SentencePiece, ``tokenizer.json``, a GPT-2 ``vocab.json`` + ``merges.txt``
pair, or nanoGPT's ``meta.pkl`` character vocabulary) with its own special tokens, its dropout and
context, nanoGPT's AdamW state when its layout matches (the provenance says which), the step, and
the history found beside the weights (or none, with the provenance saying so).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint.rundir import BEST, generation_config, model_config_json, write_logs, write_model_card
from openllm.checkpoint.state import RunState
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import OutputDir, atomic_write_json, read_json
from openllm.core.numbers import perplexity
from openllm.core.options import Opt, nonneg_int
from openllm.data.tokenizer import CONFIG_FILE, Tokenizer, find_tokenizer, load_tokenizer
from openllm.data.tokenizer.base import TOKENIZER_FILES
from openllm.interop import nanogpt
from openllm.interop.gpt2 import read_config_json, read_hf_dir, tie_head, without_mask_buffers
from openllm.interop.hf import import_hf_weights, model_types
from openllm.model import LanguageModel, build_model
from openllm.model.config import PRESETS, ImportedFields, ModelConfig
from openllm.model.scoring import evaluate_file

PROVENANCE = "provenance.json"
# What a conversion writes: --force replaces a directory holding an earlier conversion and nothing else.
CONVERT_FILES = (
    BEST,
    PROVENANCE,
    "config.json",
    "generation_config.json",
    "training_config.json",
    "training_log.json",
    "validation_log.json",
    "README.md",
    CONFIG_FILE,
    *TOKENIZER_FILES,
)


@dataclass
class Imported:
    kind: str
    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    step: int | None = None
    training_log: list | None = None
    validation_log: list | None = None
    notes: list[str] = field(default_factory=list)
    source_reported: dict = field(default_factory=dict)
    optimizer: dict[str, dict] | None = None  # AdamW moments by parameter name
    optimizer_settings: list[dict] = field(default_factory=list)
    optimizer_note: str = "fresh (the source has no optimizer state)"
    training_options: dict = field(default_factory=dict)  # the source's training settings, OpenLLM's names


def detect(path: Path) -> str:
    if ck.is_sharded_checkpoint(path):
        return "openllm-sharded"
    if path.is_file():
        return "nanogpt"
    if (path / "ckpt.pt").is_file():
        return "nanogpt"
    cfg = read_config_json(path, " (and is not a nanoGPT ckpt.pt): cannot tell what it holds")
    cfg_file = path / "config.json"
    if cfg.get("model_type") in model_types():
        return "openllm-export" if "openllm" in cfg else f"hf-{cfg['model_type']}"
    if cfg.get("model_type") == "gpt" or "GPTModel" in (cfg.get("architectures") or []):
        return "legacy"
    raise OpenLLMError(
        f"{cfg_file}: unknown model_type {cfg.get('model_type')!r} (expected {', '.join(model_types())} or legacy "
        "OpenLLM gpt)"
    )


def _tokenizer(directory: Path, override: str | None, model_config: dict | None = None) -> Tokenizer | None:
    """``--tokenizer`` if given (a nanoGPT meta.pkl too), else the tokenizer the source directory holds."""
    if override:
        if Path(override).suffix == ".pkl":
            return nanogpt.meta_tokenizer(Path(override))
        return load_tokenizer(override, model_config)
    return load_tokenizer(directory, model_config) if find_tokenizer(directory) is not None else None


def _read_log(path: Path, name: str) -> list | None:
    f = path / name
    if not f.is_file():
        return None
    data = read_json(f, "log")
    if not isinstance(data, list):
        raise OpenLLMError(f"{f} must hold a list of log entries")
    return data


def _nanogpt_style_config(d: dict, origin: str, default_dropout: float) -> ModelConfig:
    """ModelConfig from the nanoGPT-style keys the legacy config.json and nanoGPT's model_args share (each
    of the wrong type or range refused by name)."""
    if not isinstance(d, dict):
        raise OpenLLMError(f"{origin} must be a mapping of model settings, not a {type(d).__name__}")
    f = ImportedFields(d, origin)
    return ModelConfig(
        vocab_size=f.integer("vocab_size"),
        n_layer=f.integer("n_layer"),
        n_head=f.integer("n_head"),
        n_embd=f.integer("n_embd"),
        block_size=f.integer("block_size"),
        dropout=f.number("dropout", default_dropout, probability=True),
        bias=f.flag("bias", True),
    )


def import_legacy(path: Path, tokenizer: str | None) -> Imported:
    cfg = read_config_json(path)
    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        raise OpenLLMError(f"{path} has no pytorch_model.bin")
    raw = ck.load_checkpoint(weights)
    inner = ck.read_info(raw).model_state  # a legacy training checkpoint saved as pytorch_model.bin
    state = tie_head(without_mask_buffers(inner if inner is not None else raw))
    config = _nanogpt_style_config(cfg, f"{path / 'config.json'}", default_dropout=0.1)
    imp = Imported("legacy", config, state, _tokenizer(path, tokenizer), step=cfg.get("training_steps"))
    gen = path / "generation_config.json"
    if gen.is_file() and imp.tokenizer is not None:
        eos, own = (read_json(gen, "generation config") or {}).get("eos_token_id"), imp.tokenizer.eos_id
        if eos != own:
            imp.notes.append(f"fixed generation_config.json eos_token_id {eos} -> {own} (the tokenizer's eos)")
    return imp


def import_hf(path: Path, tokenizer: str | None, kind: str) -> Imported:
    cfg, state = read_hf_dir(path)
    config, state = import_hf_weights(cfg, state, str(path))
    meta = cfg.get("openllm") or {}
    imp = Imported(kind, config, state, _tokenizer(path, tokenizer, cfg), step=meta.get("step"))
    if meta.get("best_validation_loss") is not None:
        imp.source_reported["best_validation_loss"] = meta["best_validation_loss"]
    earlier = meta.get("provenance")
    if isinstance(earlier, dict) and isinstance(earlier.get("source"), str):
        imp.source_reported["provenance"] = earlier  # how an openllm export's weights came to be: kept in the chain
    return imp


def import_sharded(path: Path, tokenizer: str | None) -> Imported:
    """A sharded checkpoint directory of an --fsdp run (read whole): its weights, history, tokenizer (the run
    directory's) and AdamW moments, as one file's run directory that any tool reads."""
    view = ck.read_info(ck.load_verified(path, "convert"))
    if view.is_lora:
        raise OpenLLMError(f"{path} holds LoRA adapters: export it (openllm export merges them into the base)")
    config = ModelConfig.from_dict(view.model_config or {})
    imp = Imported("openllm-sharded", config, dict(view.model_state or {}), _tokenizer(path.parent, tokenizer, None))
    imp.step, imp.training_log, imp.validation_log = view.step, view.training_log, view.validation_log
    imp.source_reported["provenance"] = view.provenance
    state = view.optimizer_state
    if view.has_optimizer_state and "state" in state:  # AdamW's: by parameter, in the order of its two groups
        names = [n for group in build_model(config).optimizer_groups() for n in group]
        imp.optimizer = {names[i]: moments for i, moments in state["state"].items() if i < len(names)}
        imp.optimizer_settings = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
        imp.optimizer_note = "trained (AdamW, from the sharded checkpoint)"
    else:
        imp.optimizer_note = "fresh (the sharded checkpoint holds Muon's state, or none)"
    return imp


def import_nanogpt(path: Path, tokenizer: str | None) -> Imported:
    file = path if path.is_file() else path / "ckpt.pt"
    raw = ck.load_checkpoint(file)
    if "model" not in raw or "model_args" not in raw:
        raise OpenLLMError(f"{file} is not a nanoGPT checkpoint (no 'model' / 'model_args')")
    args = raw["model_args"]
    prefix = "_orig_mod."
    named = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in raw["model"].items()}
    state = tie_head(without_mask_buffers(named))
    config = _nanogpt_style_config(args, f"{file}: model_args", default_dropout=0.0)
    tok = _tokenizer(file.parent, tokenizer)
    if tokenizer is None:  # nanoGPT's character vocabulary, where its sample.py would find it
        meta = next((m for m in nanogpt.meta_candidates(file, raw) if m.is_file()), None)
        tok = nanogpt.meta_tokenizer(meta) if meta is not None else tok
    imp = Imported("nanogpt", config, state, tok, step=raw.get("iter_num"))
    if isinstance(raw.get("best_val_loss"), (int, float, torch.Tensor)):
        imp.source_reported["best_val_loss"] = float(raw["best_val_loss"])
    moments, settings, note = nanogpt.optimizer_by_name(raw, named)
    imp.optimizer, imp.optimizer_settings = moments, settings
    imp.optimizer_note = note if moments is not None else f"fresh ({note})"
    imp.training_options = nanogpt.training_options(raw)
    return imp


def _trim_padded_vocabulary(imp: Imported) -> None:
    """nanoGPT rounds GPT-2's 50,257 tokens up to 50,304 embedding rows; rows past the tokenizer's last id
    are never a target or an input, so they are dropped to make the model's vocabulary the tokenizer's."""
    assert imp.tokenizer is not None
    n, rows = imp.tokenizer.vocab_size, imp.config.vocab_size
    imp.state = {k: (v[:n] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in imp.state.items()}
    if imp.optimizer and "transformer.wte.weight" in imp.optimizer:
        m = imp.optimizer["transformer.wte.weight"]
        imp.optimizer["transformer.wte.weight"] = {**m, "exp_avg": m["exp_avg"][:n], "exp_avg_sq": m["exp_avg_sq"][:n]}
    imp.config = imp.config.replace(vocab_size=n)
    imp.notes.append(f"dropped the {rows - n} padding rows of nanoGPT's embedding ({rows} -> {n}, the tokenizer size)")


def _optimizer_state(model: LanguageModel, imp: Imported) -> dict:
    """The imported AdamW moments in the layout of OpenLLM's optimizer for ``model`` (empty when none)."""
    groups = model.optimizer_groups()
    names = [n for g in groups for n in g]
    if imp.optimizer is None or set(names) - set(imp.optimizer):
        return {}
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: imp.optimizer[n] for n in names},
        "param_groups": [
            {**s, "params": [index[n] for n in g]} for s, g in zip(imp.optimizer_settings, groups, strict=True)
        ],
    }


@dataclass
class ConvertReport:
    kind: str
    output_dir: Path
    step: int
    input_bytes: int
    components: dict[str, int]
    output_bytes: int
    best_validation_loss: float | None
    notes: list[str]
    optimizer_state: str  # what the provenance record says of it: one source for the record and the summary


def convert(
    input_path: Annotated[str | os.PathLike, Opt("directory (or nanoGPT ckpt.pt file) to import", flag="--input-dir")],
    output_dir: Annotated[str | os.PathLike, Opt("run directory to write")],
    *,
    training_steps: Annotated[
        int | None,
        Opt("steps the weights were trained for", parse=nonneg_int, default_text="what the source says, else 0"),
    ] = None,
    eval_data: Annotated[str | os.PathLike | None, Opt("text file to measure the real validation loss on")] = None,
    tokenizer: Annotated[
        str | None,
        Opt(
            "tokenizer of the weights when the input has none beside it: a tokenizer.model, tokenizer.json, "
            "vocab.json (with merges.txt), a nanoGPT meta.pkl, or a directory holding one"
        ),
    ] = None,
    force: Annotated[
        bool,
        Opt(
            "replace an earlier conversion in --output-dir (its best_model.pt and the files beside it); a "
            "training run, the input or other files there are refused, with or without it"
        ),
    ] = False,
    eval_seq_len: int = 512,
) -> ConvertReport:
    """Convert raw weights at ``input_path`` into a run directory at ``output_dir``."""
    src = Path(input_path)
    if not src.exists():
        raise OpenLLMError(f"input not found: {src}")
    # a ckpt.pt's directory is searched for its tokenizer, and a sharded checkpoint's run directory
    reads = [src, src.parent] if src.is_file() or ck.is_sharded_checkpoint(src) else [src]
    reads += [Path(p) for p in (tokenizer, eval_data) if p is not None]
    out = OutputDir(Path(output_dir), "convert", CONVERT_FILES, tuple(reads), force, mark=PROVENANCE)
    out.check()
    kind = detect(src)
    imp = (
        import_sharded(src, tokenizer)
        if kind == "openllm-sharded"
        else import_nanogpt(src, tokenizer)
        if kind == "nanogpt"
        else import_legacy(src, tokenizer)
        if kind == "legacy"
        else import_hf(src, tokenizer, kind)
    )
    problems = ck.shape_problems(imp.state, imp.config.to_dict())
    if problems:
        raise OpenLLMError(f"{src}: the weights do not match the config: {problems[0]}")
    if imp.tokenizer is not None and imp.tokenizer.vocab_size != imp.config.vocab_size:
        if kind == "nanogpt" and imp.tokenizer.vocab_size == 50257 and imp.config.vocab_size == 50304:
            _trim_padded_vocabulary(imp)
        else:
            raise OpenLLMError(
                f"the tokenizer has {imp.tokenizer.vocab_size} tokens but the embedding has "
                f"{imp.config.vocab_size} rows: they are not the same vocabulary"
            )
    if imp.tokenizer is None:
        imp.notes.append(
            "no tokenizer found beside the weights (give --tokenizer): the run cannot generate or train until "
            "one is added"
        )
    model = build_model(imp.config.replace(dropout=0.0))
    model.load_state_dict(imp.state)
    model.eval()
    step = int(training_steps if training_steps is not None else (imp.step or 0))

    training_log = (
        imp.training_log
        if imp.training_log is not None
        else (_read_log(src, "training_log.json") if src.is_dir() else None)
    )
    validation_log = (
        imp.validation_log
        if imp.validation_log is not None
        else (_read_log(src, "validation_log.json") if src.is_dir() else None)
    )
    history = (
        "kept from the checkpoint"
        if kind == "openllm-sharded"
        else "imported from training_log.json beside the weights"
        if training_log is not None
        else "no training history exists for these weights"
    )
    best = None
    if eval_data is not None:
        if imp.tokenizer is None:
            raise OpenLLMError("--eval-data needs a tokenizer (none found; give --tokenizer)")
        res = evaluate_file(
            model,
            imp.tokenizer,
            eval_data,
            seq_len=min(eval_seq_len, imp.config.block_size),
            stride=min(eval_seq_len, imp.config.block_size),
        )
        best = res.loss
        validation_log = list(validation_log or []) + [
            {"step": step, "validation_loss": best, "validation_perplexity": perplexity(best)}
        ]
    provenance: dict[str, Any] = {
        "source": f"converted from {kind} weights at {src}"
        + (f" ({imp.source_reported['provenance']['source']})" if "provenance" in imp.source_reported else ""),
        "input_kind": kind,
        "optimizer_state": imp.optimizer_note,
        "history": history,
        "best_validation_loss": f"measured on {eval_data}" if best is not None else "not measured (no --eval-data)",
        "source_reported": imp.source_reported,
        "notes": imp.notes,
    }
    model_size = next(
        (
            n
            for n, p in PRESETS.items()
            if p.model.replace(vocab_size=imp.config.vocab_size, dropout=imp.config.dropout) == imp.config
        ),
        "custom",
    )
    info = {"model_size": model_size, **model.summary(imp.config.block_size)}
    if imp.tokenizer is not None:
        info["tokenizer"] = imp.tokenizer.describe()
    state = RunState(
        step=step,
        best_validation_loss=best if best is not None else float("inf"),
        best_step=step if best is not None else None,
        stop_reason="converted",
        training_log=training_log or [],
        validation_log=validation_log or [],
    )
    stats = {
        **state.stats(epochs=None, world_size=1, device="cpu"),
        "samples_seen": None,
        "tokens_seen": None,
        "elapsed_seconds": None,
        "lowest_training_loss": None,
        "best_validation_loss": best,
    }
    # the training settings a resume starts from: the source's own where it recorded them, never a preset's
    tconfig = {
        **({"model_size": model_size} if model_size != "custom" else {}),
        "seq_len": imp.config.block_size,
        **imp.training_options,
        "dropout": imp.config.dropout,
        "max_steps": step,
    }
    optimizer_state = _optimizer_state(model, imp)
    if imp.optimizer is not None and not optimizer_state:
        provenance["optimizer_state"] = "fresh (the source's AdamW state does not cover every parameter)"
    ckpt = ck.build_checkpoint(
        model_state=model.state_dict(),
        optimizer_state=optimizer_state,
        state=state,
        model_config=imp.config,
        training_config=tconfig,
        model_info=info,
        scheduler={"name": "warmup_cosine", "last_step": step},
        training_stats=stats,
        epoch=0,
        tokenizer_sha256=imp.tokenizer.sha256 if imp.tokenizer else None,
        dataset_fingerprint=None,
        provenance=provenance,
        resume=None,
    )
    with out.replacing() as staging:  # written whole in a staging directory, then put in place
        _write_run(staging, ckpt, imp, model_size, tconfig, state, provenance, info, stats)

    input_bytes = sum(p.stat().st_size for p in ([src] if src.is_file() else src.rglob("*")) if p.is_file())
    view, comp = ck.read_info(ckpt), {}
    parts = {
        "model_state_dict": view.model_state,
        "optimizer_state_dict": view.optimizer_state,
        "training_log": view.training_log,
        "validation_log": view.validation_log,
    }
    for key, part in parts.items():
        buf = io.BytesIO()
        torch.save(part, buf)
        comp[key] = buf.tell()
    return ConvertReport(
        kind,
        out.path,
        step,
        input_bytes,
        comp,
        (out.path / BEST).stat().st_size,
        best,
        imp.notes,
        view.optimizer_note or "",
    )


def _write_run(
    d: Path,
    ckpt: dict,
    imp: Imported,
    model_size: str,
    tconfig: dict,
    state: RunState,
    provenance: dict,
    info: dict,
    stats: dict,
) -> None:
    ck.save_checkpoint(ckpt, d / BEST)
    ids = imp.tokenizer.special.as_config_ids() if imp.tokenizer is not None else {}
    atomic_write_json(d / "config.json", model_config_json(imp.config.to_dict(), {"model_size": model_size, **ids}))
    if imp.tokenizer is not None:
        atomic_write_json(d / "generation_config.json", generation_config(imp.config.block_size, imp.tokenizer.special))
    atomic_write_json(d / "training_config.json", tconfig)
    write_logs(d, state.training_log, state.validation_log)
    atomic_write_json(d / PROVENANCE, provenance)
    if imp.tokenizer is not None:
        imp.tokenizer.save(d, model_max_length=imp.config.block_size)
    write_model_card(d, "OpenLLM converted model", info, stats, {}, provenance["source"])
