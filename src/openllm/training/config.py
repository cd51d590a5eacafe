"""A training run's configuration, as two types.

:class:`TrainConfig` holds the options a user gave (command line, ``--config`` YAML, keyword arguments):
every ``openllm train`` option is declared once there (name, type, choices, default, help), and a field left
``None`` means "not given". :func:`resolve` is the one function that turns it into a :class:`RunConfig`:
given values first, then the checkpoint being resumed (its ``training_config``), then the preset of
``model_size``, then the built-in defaults declared in the fields' :class:`~openllm.core.options.Opt`,
checked once. A :class:`RunConfig` is frozen and has every field present and typed; its fields keep the
option names (so the checkpoint's ``training_config`` is :meth:`RunConfig.to_dict`, as it always was) and its
groups (:attr:`RunConfig.model`, ``.inputs``, ``.optimization``, ``.schedule``, ``.checkpointing``,
``.evaluation``, ``.distributed``) are what the functions that need one part take.

Each choice list is declared once (:data:`SCHEDULES`, :data:`OPTIMIZERS` here; devices, dtypes, tokenizer types
and architectures where they live) and gives the parser its choices, the help its text and :func:`resolve`
its check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from openllm.core.device import DEVICES, DTYPES
from openllm.core.errors import OpenLLMError
from openllm.core.extras import missing_extra
from openllm.core.options import (
    Opt,
    builtin_defaults,
    declared_options,
    nonneg_int,
    one_of,
    positive_floats,
    read_options_file,
)
from openllm.data.chat import TRAIN_ON
from openllm.data.conversations import OVERFLOW
from openllm.data.mixture import normalised_weights
from openllm.data.tokenizer import TOKENIZER_TYPES, TOKENIZER_TYPES_HELP
from openllm.model import registry
from openllm.model.config import PRESETS, get_preset
from openllm.model.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS
from openllm.model.lora import TARGETS as LORA_TARGETS
from openllm.model.lora import LoRAConfig
from openllm.training.trackers import TRACKER_PACKAGES, TRACKERS, tracker_list, wanted

PRESET = "the preset's"
ARCH_HELP = "model architecture at the preset's size: " + "; ".join(
    f"{name}: {registry.architecture(name).model.ARCHITECTURE}" for name in registry.names()
)
# The learning-rate schedules (openllm.training.schedule) and optimizers (openllm.training.optim), with what
# each is: the --lr-schedule and --optimizer choices and help.
SCHEDULES = {
    "cosine": "cosine decay",
    "wsd": "constant, then a linear cooldown; extends without disturbing the learning rate",
}
OPTIMIZERS = {
    "adamw": "AdamW",
    "muon": "PyTorch's Muon for the transformer blocks' matrices, AdamW for embeddings, biases and gains",
}


# The data layer's choice lists (data.chat.TRAIN_ON, data.conversations.OVERFLOW), each described here for the help.
TRAIN_ON_CHOICES = dict(
    zip(TRAIN_ON, ("what the assistant says, with the end of its turn", "every token of the conversation"), strict=True)
)
OVERFLOW_CHOICES = dict(
    zip(OVERFLOW, ("cut from the left (whole turns first)", "stop with an error naming it"), strict=True)
)


def described(choices: dict[str, str]) -> str:
    """'a (what a is), or b (what b is)': a choice list's help text, from the list."""
    return ", or ".join(f"{name} ({what})" for name, what in choices.items())


@dataclass
class TrainConfig:
    """Every `openllm train` option; field names are option names with '_' for '-'."""

    data: Annotated[
        list[str] | None,
        Opt(
            "a prepared dataset directory (from `openllm prepare`); several (--data A --data B, or --data A B) "
            "are a mixture, sampled by --data-weights, each validated on its own split",
            nargs="+",
            action="extend",
            metavar="DIR",
        ),
    ] = None
    data_weights: Annotated[
        list[float] | None,
        Opt(
            "the mixture's sampling weights, one per --data, comma-separated (normalised to sum to 1)",
            parse=positive_floats,
            default_text="equal",
        ),
    ] = None
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
        Opt(
            f"kind of tokenizer to train for --data-file ({TOKENIZER_TYPES_HELP})",
            choices=TOKENIZER_TYPES,
            default="sentencepiece",
        ),
    ] = None
    model_size: Annotated[str | None, Opt(f"preset: {one_of(tuple(PRESETS))}", default="tiny")] = None
    arch: Annotated[
        str | None,
        Opt(
            ARCH_HELP,
            choices=registry.names(),
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
            f"learning-rate schedule after warmup: {described(SCHEDULES)}",
            choices=tuple(SCHEDULES),
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
        Opt(described(OPTIMIZERS), choices=tuple(OPTIMIZERS), default_text=PRESET),
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
    fsdp: Annotated[
        bool | None,
        Opt(
            "under torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2) "
            "instead of replicating them (DDP); step checkpoints become directories written by every process",
            default=False,
        ),
    ] = None
    activation_checkpointing: Annotated[bool | None, Opt("recompute activations to save memory", default=False)] = None
    dist_timeout: Annotated[
        float | None,
        Opt(
            "under torchrun: seconds a process waits for the others in a collective before the run stops with an "
            "error naming the process that did not answer",
            default=1800.0,
        ),
    ] = None
    keep_last: Annotated[
        int | None, Opt("step checkpoints to keep (the best and the resumed-from one are always kept)", default=3)
    ] = None
    async_save: Annotated[
        bool | None,
        Opt("write step checkpoints in the background while training goes on (as crash-safe)", default=False),
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
        bool | None,
        Opt("also write TensorBoard event files to OUTPUT_DIR/tensorboard (as --report-to tensorboard)", default=False),
    ] = None
    report_to: Annotated[
        str | None,
        Opt(
            "experiment trackers to log to, any of " + ", ".join(TRACKERS) + " (each an extra of its name); "
            "a resumed run continues the same tracker runs",
            parse=tracker_list,
            metavar="NAME[,NAME...]",
            default="",
            default_text="none",
        ),
    ] = None
    tracker_project: Annotated[
        str | None,
        Opt(
            "the trackers' project (wandb, trackio) or experiment (MLflow); runs are named after OUTPUT_DIR",
            default="openllm",
        ),
    ] = None
    peak_flops: Annotated[float | None, Opt("peak FLOP/s of the device for MFU (known GPUs are detected)")] = None
    # The closing sample: options of the run like any other, so that a resumed run keeps what it was told
    sample_tokens: Annotated[
        int | None, Opt("length of the sample printed at the end (0: none)", default=120, parse=nonneg_int)
    ] = None
    sample_prompt: Annotated[str | None, Opt("prompt of the sample printed at the end", default="")] = None
    # Fine-tuning (`openllm finetune`): a run whose weights start from --model and whose data are conversations.
    base_model: Annotated[
        str | None,
        Opt(
            "the model to fine-tune: a run directory or checkpoint of ours (converted ones too) or a Hugging "
            "Face directory (converted on the fly)",
            flag="--model",
        ),
    ] = None
    chat_data: Annotated[
        list[str] | None,
        Opt(
            "conversations to fine-tune on: JSON lines or Parquet files (compressed too), directories or globs; "
            "records with messages, prompt + completion, or instruction (+ input) + output",
            flag="--data",
            nargs="+",
            metavar="FILE",
        ),
    ] = None
    epochs: Annotated[
        float | None, Opt("passes over the training conversations (sets --max-steps)", default_text="3 epochs")
    ] = None
    train_on: Annotated[
        str | None,
        Opt(
            f"which tokens carry the loss: {described(TRAIN_ON_CHOICES)}",
            choices=tuple(TRAIN_ON_CHOICES),
            default="assistant",
        ),
    ] = None
    overflow: Annotated[
        str | None,
        Opt(
            f"a conversation longer than --seq-len: {described(OVERFLOW_CHOICES)}",
            choices=tuple(OVERFLOW_CHOICES),
            default="truncate",
        ),
    ] = None
    skip_bad_records: Annotated[
        bool | None, Opt("count and skip records that are not conversations instead of stopping", default=False)
    ] = None
    lora_rank: Annotated[
        int | None,
        Opt("rank of LoRA adapters on the --lora-targets (0: full fine-tuning)", default=0, parse=nonneg_int),
    ] = None
    lora_alpha: Annotated[
        float | None, Opt("LoRA scaling numerator (the update is scaled by alpha/rank)", default=16.0)
    ] = None
    lora_dropout: Annotated[float | None, Opt("dropout on the LoRA adapters' input", default=0.0)] = None
    lora_targets: Annotated[
        str | None,
        Opt(
            f"matrices that get adapters, comma-separated from {', '.join(LORA_TARGETS)}",
            default=",".join(DEFAULT_LORA_TARGETS),
        ),
    ] = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def run_dir(self) -> Path:
        """The run directory: --output-dir, else its declared default (known before anything is resolved)."""
        if self.output_dir is not None and not isinstance(self.output_dir, str):  # (from YAML or a caller)
            raise OpenLLMError(f"--output-dir must be a path, got {self.output_dir!r}")
        return Path(self.output_dir or DEFAULTS["output_dir"])

    def resolved(self, inherited: dict[str, Any] | None = None) -> RunConfig:
        """:func:`resolve` of these options."""
        return resolve(self, inherited)


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
# Options that describe this invocation only and are never inherited from a checkpoint on resume (--fsdp,
# --async-save and --dist-timeout say how these processes train and write, as their number does: a resume chooses
# again)
NOT_INHERITED = (
    "resume",
    "allow_data_change",
    "reset_early_stopping",
    "output_dir",
    "fsdp",
    "async_save",
    "dist_timeout",
)


# ------------------------------------------------------------------------------ the resolved run configuration


@dataclass(frozen=True)
class ModelOptions:
    model_size: str
    arch: str
    vocab_size: int
    dropout: float
    activation_checkpointing: bool


@dataclass(frozen=True)
class InputOptions:
    """The data and how it is cut into batches."""

    data: list[str] | None
    data_weights: list[float] | None
    data_file: str | None
    validation_data: str | None
    tokenizer_dir: str | None
    tokenizer_type: str
    batch_size: int
    seq_len: int
    gradient_accumulation_steps: int
    seed: int


@dataclass(frozen=True)
class OptimizerOptions:
    optimizer: str
    weight_decay: float
    grad_clip: float
    max_bad_steps: int


@dataclass(frozen=True)
class ScheduleOptions:
    """The learning-rate schedule (:mod:`openllm.training.schedule`) and the steps it spans."""

    learning_rate: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    lr_schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    lr_decay_steps: int | None = None


@dataclass(frozen=True)
class CheckpointOptions:
    output_dir: str
    save_every: int
    keep_last: int
    async_save: bool
    resume: str | None
    allow_data_change: bool
    reset_early_stopping: bool


@dataclass(frozen=True)
class EvaluationOptions:
    """Validation, early stopping, what the run reports and the closing sample."""

    eval_every: int
    eval_batches: int
    early_stopping_patience: int
    early_stopping_min_delta: float
    log_every: int
    tensorboard: bool
    report_to: str
    tracker_project: str
    sample_tokens: int
    sample_prompt: str


@dataclass(frozen=True)
class DistributedOptions:
    """Where and how each process computes."""

    device: str
    dtype: str | None
    compile: bool
    fsdp: bool
    dist_timeout: float
    peak_flops: float | None


@dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning: the model it starts from, the conversations and how they are read, the LoRA adapters."""

    base_model: str | None
    chat_data: list[str] | None
    epochs: float | None
    train_on: str
    overflow: str
    skip_bad_records: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str

    def lora(self) -> LoRAConfig | None:
        """The LoRA adapters these options ask for (None: full fine-tuning)."""
        if not self.lora_rank:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(","))
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)


GROUPS = (
    ModelOptions,
    InputOptions,
    OptimizerOptions,
    ScheduleOptions,
    CheckpointOptions,
    EvaluationOptions,
    DistributedOptions,
    FinetuneOptions,
)


@dataclass(frozen=True)
class RunConfig:
    """A resolved run configuration (made by :func:`resolve` only): every option present, typed and checked,
    under the same names and in the same order as :class:`TrainConfig`'s fields."""

    data: list[str] | None
    data_weights: list[float] | None
    data_file: str | None
    validation_data: str | None
    tokenizer_dir: str | None
    tokenizer_type: str
    model_size: str
    arch: str
    vocab_size: int
    max_steps: int
    output_dir: str
    save_every: int
    eval_every: int
    eval_batches: int
    log_every: int
    early_stopping_patience: int
    early_stopping_min_delta: float
    batch_size: int
    seq_len: int
    gradient_accumulation_steps: int
    learning_rate: float
    min_lr: float
    warmup_steps: int
    lr_schedule: str
    cooldown_fraction: float
    lr_decay_steps: int | None
    weight_decay: float
    optimizer: str
    grad_clip: float
    dropout: float
    seed: int
    device: str
    dtype: str | None
    compile: bool
    fsdp: bool
    activation_checkpointing: bool
    dist_timeout: float
    keep_last: int
    async_save: bool
    resume: str | None
    allow_data_change: bool
    reset_early_stopping: bool
    max_bad_steps: int
    tensorboard: bool
    report_to: str
    tracker_project: str
    peak_flops: float | None
    sample_tokens: int
    sample_prompt: str
    base_model: str | None
    chat_data: list[str] | None
    epochs: float | None
    train_on: str
    overflow: str
    skip_bad_records: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str

    @property
    def finetunes(self) -> bool:
        """Whether this run fine-tunes --model on conversations (`openllm finetune`)."""
        return self.base_model is not None

    def to_dict(self) -> dict[str, Any]:
        """Every option by name: the checkpoint's ``training_config`` (what a resume inherits)."""
        return dataclasses.asdict(self)

    # A resolved config also serves where options are taken (train(), setup()): all of it counts as given.
    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def run_dir(self) -> Path:
        return Path(self.output_dir)

    def resolved(self, inherited: dict[str, Any] | None = None) -> RunConfig:
        return resolve(self, inherited)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def _group(self, kind: type) -> Any:
        return kind(**{f.name: getattr(self, f.name) for f in fields(kind)})

    @cached_property
    def model(self) -> ModelOptions:
        return self._group(ModelOptions)

    @cached_property
    def inputs(self) -> InputOptions:
        return self._group(InputOptions)

    @cached_property
    def optimization(self) -> OptimizerOptions:
        return self._group(OptimizerOptions)

    @cached_property
    def schedule(self) -> ScheduleOptions:
        return self._group(ScheduleOptions)

    @cached_property
    def checkpointing(self) -> CheckpointOptions:
        return self._group(CheckpointOptions)

    @cached_property
    def evaluation(self) -> EvaluationOptions:
        return self._group(EvaluationOptions)

    @cached_property
    def distributed(self) -> DistributedOptions:
        return self._group(DistributedOptions)

    @cached_property
    def finetune(self) -> FinetuneOptions:
        return self._group(FinetuneOptions)


def resolve(options: TrainConfig | RunConfig, inherited: dict[str, Any] | None = None) -> RunConfig:
    """The run configuration ``options`` describe: given values, then ``inherited`` (the training_config of the
    checkpoint resumed), then the preset of ``model_size``, then the built-in defaults; checked once."""
    merged = {k: v for k, v in (inherited or {}).items() if k in TRAIN_OPTION_NAMES and k not in NOT_INHERITED}
    if inherited:  # a run recorded before an option existed ran with what was then its only behaviour
        for name, value in BEFORE_THE_OPTION.items():
            merged.setdefault(name, value)
    given = options.given()
    if "data" in given or "data_file" in given:  # new data given on resume replaces the recorded source
        merged.pop("data", None)
        merged.pop("data_weights", None)
        merged.pop("data_file", None)
    merged.update(given)
    if isinstance(merged.get("data"), str):  # one dataset, as runs recorded it before mixtures (and YAML, the API)
        merged["data"] = [merged["data"]]
    tokenizer_from = "--data" if merged.get("data") else "--tokenizer-dir" if merged.get("tokenizer_dir") else None
    typed = not isinstance(options, RunConfig)  # (a resolved config holds every option, passed on as resolved)
    if typed and tokenizer_from and (shaping := [n for n in ("vocab_size", "tokenizer_type") if n in given]):
        flags = " and ".join("--" + n.replace("_", "-") for n in shaping)
        raise OpenLLMError(
            f"{flags} shape a tokenizer to train; with {tokenizer_from} the tokenizer is given (leave {flags} out)"
        )
    if isinstance(merged.get("data_weights"), str):  # as typed: "0.7,0.3" (YAML, the API)
        try:
            merged["data_weights"] = positive_floats(merged["data_weights"])
        except argparse.ArgumentTypeError as exc:
            raise OpenLLMError(f"--data-weights: {exc}") from None
    values: dict[str, Any] = {name: merged.get(name) for name in TRAIN_OPTION_NAMES}
    for name, value in DEFAULTS.items():
        if values[name] is None:
            values[name] = value
    preset = get_preset(values["model_size"])
    for name in PRESET_FIELDS:
        if values[name] is None:
            values[name] = getattr(preset, name)
    if values["dropout"] is None:
        values["dropout"] = preset.model.dropout
    if values["arch"] is None:
        values["arch"] = preset.model.arch
    lr, min_lr = values["learning_rate"], values["min_lr"]
    if min_lr is None or ("min_lr" not in given and _is_number(lr) and _is_number(min_lr) and min_lr > lr):
        # a min-lr the user did not set follows the learning rate (the presets decay to a tenth)
        values["min_lr"] = lr / 10 if _is_number(lr) else lr
    if values["base_model"] is not None or values["chat_data"] is not None:
        _finetune_defaults(values, given, merged)
    _check(values)
    return RunConfig(**values)


# `openllm finetune`'s peak learning rate where none is given: a tenth of the one the base was trained with when
# its checkpoint records it (training/setup.fine_tune_steps), else these: full fine-tuning moves every weight of a
# trained model a little; LoRA's adapters start from zero and train alone, so they take a larger one (ten times
# the full one, at most FINETUNE_LEARNING_RATE["lora"]).
FINETUNE_LEARNING_RATE = {"full": 1e-4, "lora": 1e-3}
FINETUNE_OF_PRETRAINING = 0.1
FINETUNE_EPOCHS = 3.0
# Options only `openllm train` takes (a fine-tune's data are conversations, its model and tokenizer --model's),
# and options only `openllm finetune` takes.
TRAIN_ONLY = (
    "data",
    "data_weights",
    "data_file",
    "tokenizer_dir",
    "tokenizer_type",
    "model_size",
    "arch",
    "vocab_size",
)
FINETUNE_ONLY = (
    "base_model",
    "chat_data",
    "epochs",
    "train_on",
    "overflow",
    "skip_bad_records",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)


def _finetune_defaults(values: dict[str, Any], given: dict[str, Any], merged: dict[str, Any]) -> None:
    """A fine-tune's own defaults, and its refusals of what does not go with it (``merged``: given or inherited)."""
    if values["base_model"] is None:
        raise OpenLLMError("conversations (--data FILE...) are fine-tuned from a model: give --model")
    if values["chat_data"] is None:
        raise OpenLLMError("openllm finetune needs conversations: give --data FILE...")
    if not isinstance(values["base_model"], str):
        raise OpenLLMError(f"--model must be a path, got {values['base_model']!r}")
    chat = values["chat_data"]
    if not isinstance(chat, list) or not chat or not all(isinstance(x, str) for x in chat):
        raise OpenLLMError(f"--data must be one or more paths, got {chat!r}")
    for name in TRAIN_ONLY:
        if name in given and name != "model_size":
            raise OpenLLMError(f"--{name.replace('_', '-')} is not a fine-tuning option (the model is --model's)")
    if "epochs" in given and "max_steps" in given:
        raise OpenLLMError("give either --epochs or --max-steps, not both")
    if values["epochs"] is None and "max_steps" not in merged:
        values["epochs"] = FINETUNE_EPOCHS
    lora = isinstance(values["lora_rank"], int) and values["lora_rank"] > 0
    if not lora:
        for name in ("lora_alpha", "lora_dropout", "lora_targets"):
            if name in given:
                raise OpenLLMError(f"--{name.replace('_', '-')} needs --lora-rank above 0 (LoRA adapters)")
    if lora and "optimizer" not in merged:
        values["optimizer"] = "adamw"  # (Muon orthogonalises whole matrices; adapters are rank-r factors)
    if "learning_rate" not in merged:
        values["learning_rate"] = FINETUNE_LEARNING_RATE["lora" if lora else "full"]
        if "min_lr" not in merged:
            values["min_lr"] = values["learning_rate"] / 10


def _check(values: dict[str, Any]) -> None:
    """Refuse, by option name, any value a resolved config cannot have (from YAML, keyword arguments or a
    checkpoint; the command line's parsers refuse most of them first)."""

    def bad(name: str, what: str, value: Any) -> OpenLLMError:
        return OpenLLMError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")

    def integer(name: str, minimum: int) -> None:
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise bad(name, "a positive integer" if minimum else "a non-negative integer", value)
        if value > 2**63 - 1:
            raise bad(name, "below 2**63", value)

    def number(name: str) -> None:
        value = values[name]
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
    number("cooldown_fraction")
    if values["cooldown_fraction"] > 1:
        raise bad("cooldown_fraction", "a number in [0, 1]", values["cooldown_fraction"])
    if values["peak_flops"] is not None:
        number("peak_flops")
    number("dist_timeout")
    if not values["dist_timeout"] > 0:
        raise bad("dist_timeout", "a number of seconds above 0", values["dist_timeout"])
    if values["lr_decay_steps"] is not None:
        integer("lr_decay_steps", 1)
    if values["min_lr"] > values["learning_rate"]:
        raise OpenLLMError(f"--min-lr ({values['min_lr']}) must not exceed --learning-rate ({values['learning_rate']})")
    if not _is_number(values["dropout"]) or not (0.0 <= values["dropout"] < 1.0):
        raise bad("dropout", "a number in [0, 1)", values["dropout"])
    for name in (
        "compile",
        "fsdp",
        "activation_checkpointing",
        "async_save",
        "allow_data_change",
        "reset_early_stopping",
        "tensorboard",
    ):
        if not isinstance(values[name], bool):
            raise bad(name, "true or false", values[name])
    if not isinstance(values["report_to"], str):
        raise bad("report_to", "a comma-separated list of trackers", values["report_to"])
    for name in wanted(values["report_to"], values["tensorboard"]):
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise missing_extra(f"--report-to {name}", extra, module)
    if not isinstance(values["tracker_project"], str) or not values["tracker_project"].strip():
        raise bad("tracker_project", "a name", values["tracker_project"])
    data = values["data"]
    if data is not None and (not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data)):
        raise bad("data", "one or more paths", data)
    weights = values["data_weights"]
    if weights is not None:
        if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
            raise bad("data_weights", "a list of numbers", weights)
        if data is None or len(data) < 2:
            raise OpenLLMError("--data-weights weighs a mixture: give two or more --data datasets")
        normalised_weights(weights, len(data))  # (one weight per dataset, each positive: refused by name)
    if data is not None and len(data) > 1 and values["validation_data"] is not None:
        raise OpenLLMError(
            "--validation-data with several --data datasets: a mixture validates on each dataset's own split"
        )
    for name in (
        "data_file",
        "validation_data",
        "tokenizer_dir",
        "output_dir",
        "resume",
        "model_size",
        "sample_prompt",
    ):
        if values[name] is not None and not isinstance(values[name], str):
            what = {"model_size": "a preset name", "sample_prompt": "text"}.get(name, "a path")
            raise bad(name, what, values[name])
    for option in CHOICE_OPTIONS:  # the choices the command line offers, from the same declaration
        value, choices = values[option.name], option.opt.choices or ()
        if value not in choices and not (value is None and option.name in OPTIONAL):
            raise bad(option.name, one_of(choices), value)
    if values["epochs"] is not None and (not _is_number(values["epochs"]) or not 0 < values["epochs"] < math.inf):
        raise bad("epochs", "a number above 0", values["epochs"])
    integer("lora_rank", 0)
    if not _is_number(values["lora_alpha"]) or not 0 < values["lora_alpha"] < math.inf:
        raise bad("lora_alpha", "a number above 0", values["lora_alpha"])
    if not _is_number(values["lora_dropout"]) or not (0.0 <= values["lora_dropout"] < 1.0):
        raise bad("lora_dropout", "a number in [0, 1)", values["lora_dropout"])
    if not isinstance(values["lora_targets"], str):
        raise bad("lora_targets", "comma-separated names", values["lora_targets"])
    FinetuneOptions(**{f.name: values[f.name] for f in fields(FinetuneOptions)}).lora()  # (refuses by option name)
    if not isinstance(values["skip_bad_records"], bool):
        raise bad("skip_bad_records", "true or false", values["skip_bad_records"])
    changed = next((n for n in FINETUNE_ONLY if n in DEFAULTS and values[n] != DEFAULTS[n]), None)
    if values["base_model"] is None and changed is not None:
        raise OpenLLMError(f"--{changed.replace('_', '-')} is a fine-tuning option (openllm finetune --model ...)")
    if values["data"] and values["data_file"]:
        raise OpenLLMError("give either --data (a prepared dataset) or --data-file (raw text), not both")
    get_preset(values["model_size"])


CHOICE_OPTIONS = tuple(o for o in declared_options(TrainConfig) if o.opt.choices)
# Options a resolved config may leave None ("not set": e.g. --dtype, decided by the device).
OPTIONAL = frozenset(f.name for f in fields(RunConfig) if str(f.type).endswith("| None"))


def load_yaml_options(path: str | Path) -> dict[str, Any]:
    """``train``'s options from a YAML file (``--config``), as typed values for :class:`TrainConfig` (which checks
    them); the file is read as every command reads its ``--config`` (:func:`openllm.core.options.read_options_file`)."""
    return read_options_file(path, TRAIN_OPTION_NAMES)
