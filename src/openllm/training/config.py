"""``TrainConfig``: every ``openllm train`` option, declared once (name, type, default, help).

A field left ``None`` means "not given": :meth:`TrainConfig.resolved` fills it from the checkpoint
being resumed (if any), then the preset of ``model_size``, then the built-in default declared in
the field's :class:`~openllm.core.options.Opt`. The command line and YAML files (``--config``)
are generated from and checked against these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

from openllm.core.device import DEVICES, DTYPES
from openllm.core.errors import OpenLLMError
from openllm.core.options import Opt, builtin_defaults, nonneg_int
from openllm.core.untrusted import read_yaml
from openllm.data.tokenizer import TOKENIZER_TYPES
from openllm.model.config import ARCHS, get_preset

PRESET = "the preset's"


@dataclass
class TrainConfig:
    """Every `openllm train` option; field names are option names with '_' for '-'."""

    data: Annotated[str | None, Opt("a prepared dataset directory (from `openllm prepare`)")] = None
    data_file: Annotated[
        str | None,
        Opt("raw text to prepare on the fly (cached in OUTPUT_DIR/dataset)", default_text="the bundled corpus"),
    ] = None
    validation_data: Annotated[
        str | None, Opt("a text file to validate on", default_text="hold out 10% of the training documents")
    ] = None
    tokenizer_dir: Annotated[
        str | None,
        Opt(
            "an existing tokenizer to use instead of training one: a directory holding tokenizer.model or "
            "tokenizer.json, or the file itself"
        ),
    ] = None
    tokenizer_type: Annotated[
        str | None,
        Opt("kind of tokenizer to train for --data-file", choices=TOKENIZER_TYPES, default="sentencepiece"),
    ] = None
    model_size: Annotated[str | None, Opt("preset: tiny, small, medium or large", default="tiny")] = None
    arch: Annotated[
        str | None,
        Opt(
            "model architecture: gpt2 (the legacy layout) or llama (rotary positions, RMSNorm, SwiGLU, no biases) "
            "at the preset's size",
            choices=ARCHS,
            default_text=PRESET,
        ),
    ] = None
    vocab_size: Annotated[int | None, Opt("tokenizer vocabulary when one is trained", default_text=PRESET)] = None
    max_steps: Annotated[int | None, Opt("optimizer steps to train to", default_text=PRESET)] = None
    output_dir: Annotated[str | None, Opt("run directory", default="runs/openllm")] = None
    save_every: Annotated[int | None, Opt("write checkpoint_step_N.pt every N steps", default_text=PRESET)] = None
    eval_every: Annotated[int | None, Opt("validate every N steps", default_text=PRESET)] = None
    eval_batches: Annotated[
        int | None, Opt("validation batches per evaluation (all of the validation text when it is smaller)", default=50)
    ] = None
    log_every: Annotated[int | None, Opt("plain log line every N steps when not on a terminal", default=10)] = None
    early_stopping_patience: Annotated[
        int | None, Opt("stop after N evaluations without improvement (0: never)", default=0)
    ] = None
    early_stopping_min_delta: Annotated[
        float | None, Opt("smallest decrease of validation loss that counts as improvement", default=0.0)
    ] = None
    batch_size: Annotated[int | None, Opt("sequences per micro-batch (per process)", default_text=PRESET)] = None
    seq_len: Annotated[int | None, Opt("tokens per sequence", default_text=PRESET)] = None
    gradient_accumulation_steps: Annotated[int | None, Opt("micro-batches per optimizer step", default_text=PRESET)] = (
        None
    )
    learning_rate: Annotated[float | None, Opt("peak learning rate", default_text=PRESET)] = None
    min_lr: Annotated[
        float | None, Opt("learning rate at the end of the schedule", default_text="a tenth of --learning-rate")
    ] = None
    warmup_steps: Annotated[int | None, Opt("linear warmup steps", default_text=PRESET)] = None
    lr_schedule: Annotated[
        str | None,
        Opt(
            "learning-rate schedule after warmup: cosine decay, or wsd (constant, then a linear cooldown; "
            "extends without disturbing the learning rate)",
            choices=("cosine", "wsd"),
            default_text=PRESET,
        ),
    ] = None
    cooldown_fraction: Annotated[
        float | None, Opt("wsd: share of the steps after warmup spent cooling down to --min-lr", default=0.2)
    ] = None
    lr_decay_steps: Annotated[
        int | None, Opt("step at which the cosine decay reaches --min-lr", default_text="--max-steps")
    ] = None
    weight_decay: Annotated[float | None, Opt("AdamW weight decay (matrices only)", default_text=PRESET)] = None
    optimizer: Annotated[
        str | None,
        Opt(
            "adamw, or muon (PyTorch's Muon for the transformer blocks' matrices, AdamW for embeddings, biases "
            "and gains)",
            choices=("adamw", "muon"),
            default_text=PRESET,
        ),
    ] = None
    grad_clip: Annotated[float | None, Opt("clip the gradient norm (0: off)", default=1.0)] = None
    dropout: Annotated[float | None, Opt("dropout probability", default_text=PRESET)] = None
    seed: Annotated[int | None, Opt("seed for initialisation, data order and split", default=1337)] = None
    device: Annotated[str | None, Opt("where to train", choices=DEVICES, default="auto")] = None
    dtype: Annotated[
        str | None,
        Opt(
            "autocast dtype (float16: CUDA only; bfloat16 on a CPU without AVX512-BF16 or AMX is emulated, "
            "many times slower, and warned about)",
            choices=DTYPES,
            default_text="bf16 on GPUs that have it, float32 on CPUs",
        ),
    ] = None
    compile: Annotated[bool | None, Opt("torch.compile the model", default=False)] = None
    activation_checkpointing: Annotated[bool | None, Opt("recompute activations to save memory", default=False)] = None
    keep_last: Annotated[
        int | None, Opt("step checkpoints to keep (the best and the resumed-from one are always kept)", default=3)
    ] = None
    resume: Annotated[
        str | None,
        Opt(
            "continue from a checkpoint: auto (newest good one in --output-dir) or a PATH",
            nargs="?",
            const="auto",
            metavar="auto|PATH",
        ),
    ] = None
    allow_data_change: Annotated[bool | None, Opt("allow resuming on a different dataset", default=False)] = None
    reset_early_stopping: Annotated[
        bool | None, Opt("train on although the resumed run had stopped early", default=False)
    ] = None
    max_bad_steps: Annotated[
        int | None, Opt("consecutive non-finite steps before rolling back and stopping", default=5)
    ] = None
    tensorboard: Annotated[
        bool | None, Opt("also write TensorBoard event files to OUTPUT_DIR/tensorboard", default=False)
    ] = None
    peak_flops: Annotated[float | None, Opt("peak FLOP/s of the device for MFU (known GPUs are detected)")] = None
    # The closing sample: options of the run like any other, so that a resumed run keeps what it was told
    sample_tokens: Annotated[
        int | None, Opt("length of the sample printed at the end (0: none)", default=120, parse=nonneg_int)
    ] = None
    sample_prompt: Annotated[str | None, Opt("prompt of the sample printed at the end", default="")] = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def resolved(self, inherited: dict[str, Any] | None = None) -> TrainConfig:
        """A complete, checked config: given values, then ``inherited``, then preset and defaults."""
        merged = {k: v for k, v in (inherited or {}).items() if k in TRAIN_OPTION_NAMES and k not in NOT_INHERITED}
        if inherited:  # a run recorded before an option existed ran with what was then its only behaviour
            for name, value in BEFORE_THE_OPTION.items():
                merged.setdefault(name, value)
        given = self.given()
        if "data" in given or "data_file" in given:  # new data given on resume replaces the recorded source
            merged.pop("data", None)
            merged.pop("data_file", None)
        merged.update(given)
        out = TrainConfig(**merged)
        for name, value in DEFAULTS.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        preset = get_preset(out.model_size)  # type: ignore[arg-type]
        for name in PRESET_FIELDS:
            if getattr(out, name) is None:
                setattr(out, name, getattr(preset, name))
        if out.dropout is None:
            out.dropout = preset.model.dropout
        if out.arch is None:
            out.arch = preset.model.arch
        if out.min_lr is None or (
            "min_lr" not in given
            and _is_number(out.learning_rate)
            and _is_number(out.min_lr)
            and out.min_lr > out.learning_rate
        ):
            # a min-lr the user did not set follows the learning rate (the presets decay to a tenth)
            out.min_lr = out.learning_rate / 10 if _is_number(out.learning_rate) else out.learning_rate
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name: str, what: str, value: Any) -> OpenLLMError:
            return OpenLLMError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise bad(name, "a positive integer" if minimum else "a non-negative integer", value)
            if value > 2**63 - 1:
                raise bad(name, "below 2**63", value)

        def number(name: str) -> None:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise bad(name, "a finite number >= 0", value)

        for name in (
            "max_steps",
            "save_every",
            "eval_every",
            "eval_batches",
            "log_every",
            "batch_size",
            "seq_len",
            "gradient_accumulation_steps",
            "keep_last",
            "max_bad_steps",
            "vocab_size",
        ):
            integer(name, 1)
        for name in ("warmup_steps", "early_stopping_patience", "seed", "sample_tokens"):
            integer(name, 0)
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "early_stopping_min_delta"):
            number(name)
        if self.lr_schedule not in ("cosine", "wsd"):
            raise bad("lr_schedule", "cosine or wsd", self.lr_schedule)
        number("cooldown_fraction")
        if self.cooldown_fraction > 1:  # type: ignore[operator]
            raise bad("cooldown_fraction", "a number in [0, 1]", self.cooldown_fraction)
        if self.peak_flops is not None:
            number("peak_flops")
        if self.lr_decay_steps is not None:
            integer("lr_decay_steps", 1)
        if self.min_lr > self.learning_rate:  # type: ignore[operator]
            raise OpenLLMError(f"--min-lr ({self.min_lr}) must not exceed --learning-rate ({self.learning_rate})")
        if not _is_number(self.dropout) or not (0.0 <= self.dropout < 1.0):  # type: ignore[operator]
            raise bad("dropout", "a number in [0, 1)", self.dropout)
        for name in ("compile", "activation_checkpointing", "allow_data_change", "reset_early_stopping", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false", getattr(self, name))
        for name in (
            "data",
            "data_file",
            "validation_data",
            "tokenizer_dir",
            "output_dir",
            "resume",
            "model_size",
            "sample_prompt",
        ):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                what = {"model_size": "a preset name", "sample_prompt": "text"}.get(name, "a path")
                raise bad(name, what, getattr(self, name))
        if self.arch not in ARCHS:
            raise bad("arch", " or ".join(ARCHS), self.arch)
        if self.optimizer not in ("adamw", "muon"):
            raise bad("optimizer", "adamw or muon", self.optimizer)
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise bad("tokenizer_type", " or ".join(TOKENIZER_TYPES), self.tokenizer_type)
        if self.device not in DEVICES:
            raise bad("device", ", ".join(DEVICES), self.device)
        if self.dtype not in (None, *DTYPES):
            raise bad("dtype", ", ".join(DTYPES), self.dtype)
        if self.data and self.data_file:
            raise OpenLLMError("give either --data (a prepared dataset) or --data-file (raw text), not both")
        get_preset(self.model_size)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


TRAIN_OPTION_NAMES = tuple(f.name for f in fields(TrainConfig))
# Built-in defaults of the options a preset does not set, from their declarations above.
DEFAULTS: dict[str, Any] = builtin_defaults(TrainConfig)
PRESET_FIELDS = (
    "max_steps",
    "save_every",
    "eval_every",
    "batch_size",
    "seq_len",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "gradient_accumulation_steps",
    "vocab_size",
    "optimizer",
    "lr_schedule",
)
# What a run recorded before these options existed did; resuming it keeps doing that, whatever its preset says now.
BEFORE_THE_OPTION = {"optimizer": "adamw", "lr_schedule": "cosine"}
# Options that describe this invocation only and are never inherited from a checkpoint on resume.
NOT_INHERITED = ("resume", "allow_data_change", "reset_early_stopping", "output_dir")


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """Options from a YAML file, keys normalised to field names; unknown keys are an error. The file is read by
    the bounded reader (no anchors or aliases, bounded depth and numbers, valid text; an options file is a few
    lines, so at most 1 MB)."""
    data = read_yaml(path, "config file", max_bytes=1 << 20) or {}
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
