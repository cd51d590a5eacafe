"""nanoGPT checkpoints: ``ckpt.pt`` (weights, ``model_args``, ``config``, AdamW state) and the
character vocabulary that nanoGPT's ``prepare.py`` writes to ``meta.pkl``.

``meta.pkl`` is a pickle, and unpickling runs whatever code a pickle names. It is read here with an
unpickler that resolves no global at all, so only plain containers, strings and numbers can come out;
a file that names any function or class is refused before anything in it runs. The result must then
be the dict nanoGPT writes (``vocab_size``, ``stoi``, ``itos``) with a consistent vocabulary.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer.hf import HFTokenizer, character_tokenizer

META_FILE = "meta.pkl"
MAX_META_BYTES = 16 << 20  # a character vocabulary is a few kB
# nanoGPT's train.py options that are OpenLLM training options under another name (or the same one).
TRAINING_OPTIONS = {
    "learning_rate": "learning_rate",
    "min_lr": "min_lr",
    "warmup_iters": "warmup_steps",
    "lr_decay_iters": "lr_decay_steps",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "batch_size": "batch_size",
    "block_size": "seq_len",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "seed": "seed",
}


class _NoGlobals(pickle.Unpickler):
    def __init__(self, data: bytes, origin: str):
        super().__init__(io.BytesIO(data))
        self.origin = origin

    def find_class(self, module: str, name: str):
        raise OpenLLMError(
            f"{self.origin} refers to {module}.{name}: a nanoGPT meta.pkl holds only plain dicts of strings and "
            "ints, and this one would run code when loaded; refusing to read it"
        )

    def persistent_load(self, pid):
        raise OpenLLMError(f"{self.origin} uses persistent ids, which a nanoGPT meta.pkl never does; refusing it")


def read_meta(path: Path) -> dict[str, int]:
    """The character -> id map (``stoi``) of a nanoGPT ``meta.pkl``, read without running any code."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise OpenLLMError(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_META_BYTES:
        raise OpenLLMError(f"{path} is {size:,} bytes, far larger than a character vocabulary; refusing it")
    try:
        meta = _NoGlobals(path.read_bytes(), str(path)).load()
    except OpenLLMError:
        raise
    except Exception as exc:  # truncated or not a pickle: pickle raises many kinds
        raise OpenLLMError(f"{path} is not a readable nanoGPT meta.pkl ({type(exc).__name__}: {exc})") from None
    return _vocabulary(meta, path)


def _vocabulary(meta: object, path: Path) -> dict[str, int]:
    def bad(what: str) -> OpenLLMError:
        return OpenLLMError(f"{path} is not a nanoGPT character vocabulary: {what}")

    if not isinstance(meta, dict):
        raise bad(f"it holds a {type(meta).__name__}, not a dict")
    stoi, itos = meta.get("stoi"), meta.get("itos")
    if stoi is None and itos is None:
        raise bad("it has neither 'stoi' nor 'itos'" + (" (a GPT-2 BPE meta.pkl: give --tokenizer)" if meta else ""))
    if itos is not None:
        if not isinstance(itos, dict) or not all(isinstance(k, int) and isinstance(v, str) for k, v in itos.items()):
            raise bad("'itos' must map ints to strings")
        from_itos = {v: k for k, v in itos.items()}
        if len(from_itos) != len(itos):
            raise bad("'itos' gives two ids the same character")
    if stoi is not None:
        if not isinstance(stoi, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in stoi.items()):
            raise bad("'stoi' must map strings to ints")
        if itos is not None and from_itos != stoi:
            raise bad("'stoi' and 'itos' disagree")
    vocab: dict[str, int] = stoi if stoi is not None else from_itos
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise bad("its ids are not 0..N-1")
    if any(len(c) != 1 for c in vocab):
        raise bad("its entries are not single characters")
    size = meta.get("vocab_size", len(vocab))
    if size != len(vocab):
        raise bad(f"vocab_size {size!r} but {len(vocab)} characters")
    return vocab


def meta_candidates(ckpt_file: Path, raw: dict) -> list[Path]:
    """Where nanoGPT keeps ``meta.pkl``: beside ``ckpt.pt``, or in ``data/<dataset>/`` of the nanoGPT checkout
    (the checkpoint's parent folder or the current directory), as its ``sample.py`` looks for it; ``raw`` is
    nanoGPT's checkpoint dict, whose ``config`` names the dataset."""
    found = [ckpt_file.parent / META_FILE]
    config = raw.get("config") if isinstance(raw, dict) else None
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(dataset, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", dataset) and dataset not in (".", ".."):
        found += [ckpt_file.parent.parent / "data" / dataset / META_FILE, Path("data") / dataset / META_FILE]
    return found


def meta_tokenizer(path: Path) -> HFTokenizer:
    return character_tokenizer(read_meta(path))


def parameter_names(model_state: dict[str, torch.Tensor]) -> list[str]:
    """nanoGPT's parameters in ``named_parameters()`` order: the state dict's order without the mask buffers
    and without ``lm_head.weight`` (tied to the token embedding, so listed once)."""
    return [
        k
        for k, t in model_state.items()
        if k != "lm_head.weight" and not (k.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() in (0, 4))
    ]


def optimizer_groups(model_state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The parameter names of nanoGPT's two AdamW groups: matrices (weight decay), then the rest."""
    names = parameter_names(model_state)
    return [[n for n in names if model_state[n].dim() >= 2], [n for n in names if model_state[n].dim() < 2]]


def optimizer_by_name(raw: dict, model_state: dict[str, torch.Tensor]) -> tuple[dict[str, dict] | None, list, str]:
    """nanoGPT's AdamW moments keyed by parameter name and its two groups' settings, or None and the reason
    they cannot be used."""
    opt = raw.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not opt["state"]:
        return None, [], "the checkpoint holds no optimizer state"
    groups = optimizer_groups(model_state)
    saved = opt.get("param_groups")
    if not isinstance(saved, list) or [len(g.get("params", [])) for g in saved] != [len(g) for g in groups]:
        sizes = [len(g.get("params", [])) for g in saved] if isinstance(saved, list) else "?"
        return (
            None,
            [],
            (
                f"its AdamW groups ({sizes} parameters) do not match nanoGPT's layout for these weights "
                f"({[len(g) for g in groups]})"
            ),
        )
    out = {}
    for group, names in zip(saved, groups, strict=True):
        for index, name in zip(group["params"], names, strict=True):
            entry = opt["state"].get(index)
            keys = ("step", "exp_avg", "exp_avg_sq")
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), torch.Tensor) for k in keys):
                return None, [], f"the AdamW state of {name} is missing or incomplete"
            shape, want = tuple(entry["exp_avg"].shape), tuple(model_state[name].shape)
            if shape != want or tuple(entry["exp_avg_sq"].shape) != want:
                return None, [], f"the AdamW state of {name} has shape {shape}, the weight {want}"
            out[name] = {k: entry[k] for k in keys}
    settings = [{k: v for k, v in g.items() if k != "params"} for g in saved]
    return out, settings, f"imported from the nanoGPT checkpoint's AdamW state ({len(out)} parameters)"


def training_options(raw: dict) -> dict:
    """The nanoGPT ``config`` values that have an OpenLLM training option, under OpenLLM's names."""
    config: dict = raw["config"] if isinstance(raw.get("config"), dict) else {}
    return {
        ours: config[theirs]
        for theirs, ours in TRAINING_OPTIONS.items()
        if isinstance(config.get(theirs), (int, float)) and not isinstance(config.get(theirs), bool)
    }
