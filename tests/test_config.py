"""The training configuration's two types: the options a user gave (TrainConfig) and the resolved run
configuration (RunConfig), with every choice list declared once and mypy checking the training code."""

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from openllm.cli import build_parser
from openllm.core.errors import OpenLLMError
from openllm.training import config as C
from openllm.training.config import RunConfig, TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[1]


def train_parser(command: str = "train") -> argparse.ArgumentParser:
    sub = build_parser(command)
    return next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def test_the_resolved_config_is_frozen_complete_typed_and_grouped():
    cfg = TrainConfig(model_size="tiny").resolved()
    assert isinstance(cfg, RunConfig) and resolve(TrainConfig(model_size="tiny")) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 1  # type: ignore[misc]
    given, resolved = dataclasses.fields(TrainConfig), dataclasses.fields(RunConfig)
    # the same names in the same order: RunConfig.to_dict() is the checkpoint's training_config as it always was
    assert [f.name for f in resolved] == [f.name for f in given] == list(cfg.to_dict())
    for g, r in zip(given, resolved, strict=True):  # each field typed as given, "not given" (None) gone
        assert g.type.startswith(f"Annotated[{r.type if r.name in C.OPTIONAL else r.type + ' | None'},"), g.name
    assert C.OPTIONAL == {
        "data",
        "data_weights",
        "data_file",
        "validation_data",
        "tokenizer_dir",
        "lr_decay_steps",
        "dtype",
    } | {
        "resume",
        "peak_flops",
        "base_model",
        "chat_data",
        "epochs",
    }
    assert all(cfg.to_dict()[name] is not None for name in C.TRAIN_OPTION_NAMES if name not in C.OPTIONAL)
    # every option is in exactly one group, and each group reads the config's own values
    grouped = [f.name for group in C.GROUPS for f in dataclasses.fields(group)]
    assert sorted(grouped) == sorted(C.TRAIN_OPTION_NAMES)
    assert cfg.schedule == C.ScheduleOptions(
        cfg.learning_rate, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.cooldown_fraction, None
    )
    assert (cfg.model.arch, cfg.inputs.seq_len, cfg.optimization.optimizer) == (cfg.arch, cfg.seq_len, cfg.optimizer)
    assert (cfg.checkpointing.output_dir, cfg.evaluation.eval_every, cfg.distributed.device) == (
        cfg.output_dir,
        cfg.eval_every,
        cfg.device,
    )
    # resolving again (a resolved config handed to train()) changes nothing
    assert cfg.resolved() == cfg and cfg.resolved(cfg.to_dict()) == cfg


@pytest.mark.parametrize("option", [o.name for o in C.CHOICE_OPTIONS])
def test_each_choice_list_is_the_parsers_the_checks_and_the_helps(option):
    declared = next(o for o in C.CHOICE_OPTIONS if o.name == option).opt.choices
    command = "finetune" if option in C.FINETUNE_ONLY else "train"
    action = next(a for a in train_parser(command)._actions if a.dest == option)
    assert tuple(action.choices) == declared
    if option in ("lr_schedule", "optimizer", "arch"):  # the help says what each choice is
        assert all(name in action.help for name in declared)
    with pytest.raises(OpenLLMError) as err:
        TrainConfig(**{option: "bogus"}).resolved()
    assert str(err.value) == f"--{option.replace('_', '-')} must be {C.one_of(declared)}, got 'bogus'"


def test_schedules_and_optimizers_are_declared_once():
    from openllm.training import optim, schedule

    assert not hasattr(schedule, "SCHEDULES") and not hasattr(optim, "OPTIMIZERS")
    for name in C.SCHEDULES:
        TrainConfig(lr_schedule=name).resolved()
    for name in C.OPTIMIZERS:
        TrainConfig(optimizer=name).resolved()
    literals = []
    for path in (ROOT / "src" / "openllm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple) and {getattr(e, "value", None) for e in node.elts} in (
                {"cosine", "wsd"},
                {"adamw", "muon"},
            ):
                literals.append(f"{path.name}:{node.lineno}")
    assert not literals, literals


def test_the_default_output_directory_is_declared_once():
    default = C.DEFAULTS["output_dir"]
    assert TrainConfig().run_dir() == Path(default) and TrainConfig().resolved().output_dir == default
    action = next(a for a in train_parser()._actions if a.dest == "output_dir")
    assert f"(default: {default})" in action.help
    written = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in (ROOT / "src" / "openllm").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == default
    ]
    assert written == ["src/openllm/training/config.py:" + written[0].split(":")[1]], written


def test_mypy_checks_the_whole_package_with_no_error_codes_switched_off():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib is Python 3.11+; 3.10 is supported)
    mypy = text[text.index("[tool.mypy]") :]
    assert "\ncheck_untyped_defs = true\n" in mypy
    overrides = [block.split("\n[tool.", 1)[0] for block in mypy.split("[[tool.mypy.overrides]]")[1:]]
    assert not [b for b in overrides if "disable_error_code" in b], overrides
    assert not [b for b in overrides if "openllm" in b], overrides  # (only third-party packages go unfollowed)
    assert 'disable_error_code = ["annotation-unchecked"]' in mypy.split("[[tool.mypy.overrides]]")[0]


def test_a_run_directory_that_is_not_a_path_is_refused_by_name():
    from openllm.training.loop import train

    with pytest.raises(OpenLLMError, match=r"^--output-dir must be a path, got 5$"):
        train(TrainConfig(output_dir=5, resume="auto"))  # type: ignore[arg-type]  # as a YAML file may say
