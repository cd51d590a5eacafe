"""Hugging Face interop: write a directory that stock ``transformers`` loads as GPT-2, and read it back.

Layout of an export directory::

    config.json              a standard GPT2Config ("model_type": "gpt2"), plus an "openllm" block
    model.safetensors        GPT-2 key names, Conv1D (in, out) weight layout, tied head stored once
    tokenizer.json           the SentencePiece BPE as a `tokenizers` BPE with byte fallback (same ids)
    tokenizer_config.json    PreTrainedTokenizerFast with <s> </s> <unk> <pad>
    special_tokens_map.json
    tokenizer.model          the original SentencePiece model (for OpenLLM itself)
    generation_config.json   bos 2, eos 3, pad 0
    README.md                model card with the training figures
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from openllm import __version__
from openllm import checkpoint as ck
from openllm.config import ModelConfig
from openllm.errors import OpenLLMError
from openllm.fileio import atomic_write_json, atomic_write_text, fsync_dir, read_json
from openllm.rundir import generation_config, model_card
from openllm.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer, load_tokenizer

# Linear layers that Hugging Face GPT-2 stores as Conv1D, i.e. transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's names and layout (tied head omitted, zero biases if bias=False)."""
    out = {}
    for k, t in state.items():
        if k == "lm_head.weight":
            continue
        t = t.detach().to(torch.float32)
        out[k] = (t.t() if k.endswith(CONV1D) else t).contiguous().clone()
    if not config.bias:
        C = config.n_embd
        sizes = {"ln_1.bias": C, "ln_2.bias": C, "attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C,
                 "mlp.c_fc.bias": 4 * C, "mlp.c_proj.bias": C}
        for i in range(config.n_layer):
            for name, n in sizes.items():
                out[f"transformer.h.{i}.{name}"] = torch.zeros(n)
        out["transformer.ln_f.bias"] = torch.zeros(C)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 (Conv1D layout, with or without the ``transformer.`` prefix) to our layout; mask buffers dropped."""
    out = {}
    for k, t in state.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() in (0, 4):
            continue
        name = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        out[name] = (t.t() if name.endswith(CONV1D) else t).contiguous()
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_config(config: ModelConfig, extra: dict | None = None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
        "tie_word_embeddings": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "dtype": "float32",
        "openllm": {"version": __version__, "bias": config.bias, "activation": config.activation, **(extra or {})},
    }


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """The SentencePiece model as a `tokenizers` BPE that yields the same ids (see tests/test_export.py)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
    # SentencePiece BPE merges pieces in the order of the merged piece's score, i.e. its id.
    merges = sorted((vocab[p], vocab[p[:i]], vocab[p[i:]], p[:i], p[i:])
                    for p in normal for i in range(1, len(p)) if p[:i] in normal and p[i:] in normal)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    spec = proto.normalizer_spec
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    hf.add_special_tokens([SPECIAL_TOKENS[k] for k in ("pad_token", "unk_token", "bos_token", "eos_token")])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", BOS_ID)])
    return hf.to_str()


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, int]


def export_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, force: bool = False) -> ExportResult:
    """Write a Hugging Face GPT-2 directory for a checkpoint file (or a run directory's best model)."""
    from safetensors.torch import save_file

    from openllm.loading import resolve_checkpoint_path

    src = resolve_checkpoint_path(checkpoint)
    ckpt = ck.load_checkpoint(src)
    v = ck.verify_checkpoint(src, ckpt)
    if not v.ok:
        raise OpenLLMError(f"cannot export {src}: {'; '.join(v.problems)}")
    config = ModelConfig.from_dict(ckpt["config"])
    tok_path = src.parent / "tokenizer.model"
    tok = load_tokenizer(tok_path)
    if tok.vocab_size != config.vocab_size:
        raise OpenLLMError(f"{tok_path} has {tok.vocab_size} tokens, the model's embedding {config.vocab_size}")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OpenLLMError(f"output directory {out} is not empty; choose another or pass --force")
    stats = ckpt.get("training_stats") or {}
    extra = {"source_checkpoint": str(src), "step": ckpt.get("step"), "best_validation_loss": _num(ckpt.get("best_validation_loss")),
             "tokenizer_sha256": tok.sha256, "dataset_fingerprint": ckpt.get("dataset_fingerprint"),
             "provenance": ckpt.get("provenance"), "training_stats": stats}
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(to_hf_state_dict(ckpt["model_state_dict"], config), str(staging / "model.safetensors"),
                  metadata={"format": "pt", "openllm_version": __version__})
        atomic_write_json(staging / "config.json", hf_config(config, extra))
        atomic_write_text(staging / "tokenizer.json", hf_tokenizer_json(tok))
        atomic_write_json(staging / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False})
        atomic_write_json(staging / "special_tokens_map.json", {k: v for k, v in SPECIAL_TOKENS.items()})
        shutil.copyfile(tok_path, staging / "tokenizer.model")
        atomic_write_json(staging / "generation_config.json", {**generation_config(config.block_size),
                                                                "transformers_version": "4.40.0"})
        info = dict(ckpt.get("model_info") or {})
        info.setdefault("parameters", sum(t.numel() for k, t in ckpt["model_state_dict"].items() if k != "lm_head.weight"))
        info.setdefault("vocab_size", config.vocab_size)
        info.setdefault("context", config.block_size)
        provenance = (ckpt.get("provenance") or {}).get("source", "trained with openllm")
        atomic_write_text(staging / "README.md", model_card("OpenLLM model (Hugging Face export)", info, stats,
                                                            ckpt.get("training_config") or {}, provenance)
                          + "\nLoad with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.\n")
        fsync_dir(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, {p.name: p.stat().st_size for p in sorted(out.iterdir())})


def _num(x):
    return x if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else None


def read_config_json(path: Path, missing_hint: str = "") -> dict:
    """A model directory's config.json as a dict, or one clear error."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise OpenLLMError(f"{path} has no config.json{missing_hint}")
    cfg = read_json(cfg_file, "model config")
    if not isinstance(cfg, dict):
        raise OpenLLMError(f"{cfg_file} must hold a JSON object")
    return cfg


def read_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights (safetensors preferred, else pytorch_model.bin loaded weights-only)."""
    from safetensors.torch import load_file

    cfg = read_config_json(path)
    if (path / "model.safetensors").is_file():
        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as exc:  # safetensors raises its own error types
            raise OpenLLMError(f"{path / 'model.safetensors'} is corrupt: {exc}") from None
    elif (path / "pytorch_model.bin").is_file():
        state = ck.load_checkpoint(path / "pytorch_model.bin")
    else:
        raise OpenLLMError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return cfg, state


def config_from_hf(cfg: dict, origin: str) -> ModelConfig:
    """Our ModelConfig for a GPT2Config dict, refusing variants this model cannot reproduce."""
    act = cfg.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    problems = []
    if act not in acts:
        problems.append(f"activation_function {act!r}")
    if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 0)):
        problems.append(f"n_inner {cfg.get('n_inner')}")
    if abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {cfg.get('layer_norm_epsilon')}")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        problems.append("non-standard attention scaling")
    if cfg.get("tie_word_embeddings") is False:
        problems.append("untied output head")
    if problems:
        raise OpenLLMError(f"{origin}: unsupported GPT-2 variant ({', '.join(problems)})")
    extra = cfg.get("openllm") or {}
    try:
        return ModelConfig(vocab_size=int(cfg["vocab_size"]), n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]),
                           n_embd=int(cfg["n_embd"]), block_size=int(cfg.get("n_positions") or cfg["n_ctx"]),
                           dropout=float(cfg.get("resid_pdrop", 0.0)), bias=bool(extra.get("bias", True)),
                           activation=extra.get("activation", acts[act]))
    except KeyError as exc:
        raise OpenLLMError(f"{origin}: config.json lacks {exc.args[0]}") from None


def load_export(path: str | os.PathLike, device="cpu"):
    """Load an exported (or any GPT-2) directory for use; its tokenizer.model is required."""
    from openllm.loading import LoadedModel
    from openllm.model import GPT

    path = Path(path)
    cfg, state = read_hf_dir(path)
    config = config_from_hf(cfg, str(path)).replace(dropout=0.0)
    state = from_hf_state_dict(state)
    problems = ck.shape_problems(state, config.to_dict())
    if problems:
        raise OpenLLMError(f"{path}: {problems[0]}")
    model = GPT(config)
    model.load_state_dict(state)
    tok = load_tokenizer(path / "tokenizer.model")
    meta = cfg.get("openllm") or {}
    return LoadedModel(model.to(device).eval(), tok, path, {"dataset_fingerprint": meta.get("dataset_fingerprint"),
                                                           "step": meta.get("step")})
