"""Options declared once, where the library uses them, and turned into command-line flags.

A library function's parameter or a dataclass field becomes a command-line option by carrying an
:class:`Opt` in its annotation::

    def prepare_dataset(..., vocab_size: Annotated[int, Opt("tokenizer vocabulary", parse=positive_int)] = 4000)

The name (``--vocab-size``), type, choices, default and help then live in that one place:
:func:`add_options` builds the argparse arguments from it and :func:`option_values` collects the
parsed values back as keyword arguments. The help text prints the default once, from the
declaration (or ``Opt.default_text`` where the default is decided later, e.g. by a preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Opt:
    """How one parameter appears on the command line."""

    help: str
    flag: str | None = None  # default: "--" + name with "-" for "_"
    parse: Callable[[str], Any] | None = None  # argparse type (also the value check)
    choices: tuple[str, ...] | None = None
    nargs: str | None = None
    action: str | None = None  # argparse's (e.g. "extend": a repeated flag adds to the list, never replaces it)
    metavar: str | None = None
    const: Any = None  # with nargs="?": the value of the bare flag
    default: Any = _EMPTY  # the built-in default when the parameter's own default means "not given" (None)
    default_text: str | None = None  # help text for a default decided elsewhere ("the preset's")


@dataclass(frozen=True)
class Option:
    name: str
    opt: Opt
    type: Any
    default: Any  # the declared default (_EMPTY: required)

    @property
    def flag(self) -> str:
        return self.opt.flag or "--" + self.name.replace("_", "-")

    @property
    def builtin_default(self) -> Any:
        """The value used when the option is not given."""
        return self.opt.default if self.opt.default is not _EMPTY else self.default

    @property
    def required(self) -> bool:
        return self.default is _EMPTY


def declared_options(target: Any) -> list[Option]:
    """The :class:`Opt`-annotated parameters of a function, or fields of a dataclass, in order."""
    hints = typing.get_type_hints(target, include_extras=True)
    if dataclasses.is_dataclass(target):
        names = [(f.name, f.default) for f in dataclasses.fields(target)]
    else:
        names = [(p.name, p.default) for p in inspect.signature(target).parameters.values()]
    out = []
    for name, default in names:
        hint = hints.get(name)
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *extras = typing.get_args(hint)
        opt = next((e for e in extras if isinstance(e, Opt)), None)
        if opt is not None:
            out.append(Option(name, opt, base, default if default is not dataclasses.MISSING else _EMPTY))
    return out


def builtin_defaults(target: Any) -> dict[str, Any]:
    """name -> the value an option takes when not given, for options whose default is set in Opt."""
    return {o.name: o.opt.default for o in declared_options(target) if o.opt.default is not _EMPTY}


def _is_bool(tp: Any) -> bool:
    return tp is bool or (
        typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and bool in typing.get_args(tp)
    )


def _scalar(tp: Any) -> Any:
    """int / float / str of a possibly optional annotation."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) else [tp]
    for kind in (bool, int, float):
        if kind in args:
            return kind
    return str


def add_options(parser: argparse.ArgumentParser, target: Any, skip: tuple[str, ...] = ()) -> None:
    """Add every declared option of ``target`` to ``parser``."""
    for o in declared_options(target):
        if o.name in skip:
            continue
        help_text = o.opt.help
        shown = o.opt.default_text or (None if o.builtin_default in (None, False, _EMPTY) else o.builtin_default)
        if shown is not None:
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": o.name, "help": help_text.replace("%", "%%")}
        if o.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = o.default
        if _is_bool(o.type):
            kwargs["action"] = "store_true"
        else:
            kind = _scalar(o.type)
            kwargs["type"] = o.opt.parse or (int_value if kind is int else float_value if kind is float else None)
            for key in ("choices", "nargs", "action", "metavar", "const"):
                value = getattr(o.opt, key)
                if value is not None:
                    kwargs[key] = value
            if o.opt.nargs in ("+", "*") and o.opt.action is None and o.default in (None, _EMPTY):
                kwargs["action"] = "extend"  # a repeated flag adds to the list (argparse would keep the last only)
        parser.add_argument(o.flag, **kwargs)


def option_values(args: argparse.Namespace, target: Any) -> dict[str, Any]:
    """The parsed values of ``target``'s declared options, as keyword arguments for it."""
    return {o.name: getattr(args, o.name) for o in declared_options(target) if hasattr(args, o.name)}


# ----------------------------------------------------------------------------- value parsers


def checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts the text and checks the value, naming ``what`` it expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


MAX_INT = 2**63 - 1  # numbers beyond what torch and NumPy take are refused at the door
int_value = checked(int, lambda v: -MAX_INT <= v <= MAX_INT, "an integer")
float_value = checked(
    float, lambda v: True, "a number"
)  # range checks belong to the option (e.g. TrainConfig.validate)
positive_int = checked(int, lambda v: 0 < v <= MAX_INT, "a positive integer")
nonneg_int = checked(int, lambda v: 0 <= v <= MAX_INT, "an integer >= 0")
nonneg_float = checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
fraction = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")


def _numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


positive_floats = checked(
    _numbers, lambda v: all(0 < x < math.inf for x in v), "comma-separated finite numbers > 0 (e.g. 0.7,0.3)"
)
fraction_incl = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
port = checked(int, lambda v: 0 < v < 65536, "a port number 1-65535")


def at_most(maximum: int, why: str = "") -> Callable[[str], int]:
    """A positive integer up to ``maximum`` (``why`` says where the bound comes from), for the options that size
    processes, threads or buffers: a slip of the keyboard must not fork thousands or allocate terabytes."""
    return checked(int, lambda v: 0 < v <= maximum, f"a positive integer up to {maximum:,}{why}")


def one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c': a choice list as help and error text, from the list itself (never written out by hand)."""
    return " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else list(choices))


# Tokens generated for one sequence (a request's max_tokens, generate's --max-new-tokens): each is kept, with
# its log-probabilities where asked for, until the answer is complete.
MAX_NEW_TOKENS = 1 << 20


# ----------------------------------------------------------------------------- options files (--config)

CONFIG_HELP = "YAML file of options (keys as the option names, with - or _); command-line values win"


def read_options_file(path: str | os.PathLike, known: Collection[str]) -> dict[str, Any]:
    """Options from a YAML file (``--config``, every command), keys normalised to option names (``max-steps``
    and ``max_steps`` are ``max_steps``); a key that is not one of ``known`` or has no value is one error naming
    it. The file is read by the bounded reader (no anchors or aliases, bounded depth and numbers, valid text;
    an options file is a few lines, so at most 1 MB)."""
    from openllm.core.errors import OpenLLMError
    from openllm.core.untrusted import read_yaml

    data = read_yaml(path, "config file", max_bytes=1 << 20) or {}
    if not isinstance(data, dict):
        raise OpenLLMError(f"config file {path} must hold a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise OpenLLMError(f"config file {path}: unknown option {key!r}")
        if value is None:
            raise OpenLLMError(f"config file {path}: option {key!r} has no value")
        out[name] = value
    return out


def options_file_argv(
    parser: argparse.ArgumentParser, path: str | os.PathLike, command_line: Collection[str] = ()
) -> list[str]:
    """The options of a YAML file as command-line arguments of ``parser``'s command, so that each value goes
    through its option's own parser and checks, exactly as if typed (and the real command line, parsed after
    them, wins). ``true``/``false`` set or leave a flag; a list fills an option that takes several values,
    unless ``command_line`` gives that option too (a list the command line gives replaces the file's, as every
    other value does, rather than adding to it)."""
    from openllm.core.errors import OpenLLMError

    options = {  # by flag name (``input`` for --input) and by destination (``inputs``)
        name: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config") and not isinstance(a, argparse._VersionAction)
        for name in {a.dest, *(f.lstrip("-").replace("-", "_") for f in a.option_strings)}
    }
    argv: list[str] = []
    typed = {a.split("=", 1)[0] for a in command_line if a.startswith("-")}
    for name, value in read_options_file(path, options).items():
        action = options[name]
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._ExtendAction) and typed & set(action.option_strings):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise OpenLLMError(f"config file {path}: option {name!r} must be true or false, got {value!r}")
            argv += [flag] if value else []
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and action.nargs not in ("+", "*"):
            raise OpenLLMError(f"config file {path}: option {name!r} takes one value, got a list")
        if any(isinstance(v, (dict, list)) for v in values):
            raise OpenLLMError(f"config file {path}: option {name!r} must be a plain value")
        argv += [flag, *(_yaml_text(v) for v in values)]
    return argv


def _yaml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
