"""The one bounded reader for JSON and YAML that came from outside (configs, logs, JSON lines, request bodies).

Python's parsers reach the interpreter's limits on hostile input: nesting thousands deep is a
``RecursionError``, an integer of more than 4,300 digits a ``ValueError``, and a ``\\ud800`` escape
gives a string that cannot be written as UTF-8. Here every document is bounded before it is used:

* nesting at most :data:`MAX_DEPTH` deep, checked by a scan of the brackets (no recursion) before parsing;
* integers of at most :data:`MAX_INT_DIGITS` digits (Hugging Face writes 10**30 as "no limit");
* text that is valid Unicode (no lone surrogates), in keys and values.

A violation is a :class:`BadDocument` (a ``ValueError``) that says what is wrong and where (line and column,
or the key path such as ``$.layers[3].name``); :func:`read_json` and :func:`read_yaml` turn it into one
:class:`~openllm.core.errors.OpenLLMError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from openllm.core.errors import OpenLLMError, first_line

MAX_DEPTH = 64
MAX_INT_DIGITS = 40
# a JSON string (so brackets inside it are skipped) or a bracket; valid JSON has no quote outside strings
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class BadDocument(ValueError):
    """What is wrong with a document and where; ``kind`` is a short name for counting skipped records."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class _HugeInt:
    """Stands in for an integer literal with too many digits while the walk finds where it is."""

    def __init__(self, digits: int):
        self.digits = digits


class _TooLong(Exception):
    pass


def _integer(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _TooLong
    return int(text)


# Built once: json.loads with options builds a decoder per call, which costs a third of parsing a short line.
_DECODER = json.JSONDecoder(parse_int=_integer)
_MARKING = json.JSONDecoder(
    parse_int=lambda text: _HugeInt(len(text.lstrip("-"))) if len(text) > MAX_INT_DIGITS else int(text)
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(data: str | bytes) -> Any:
    """Parse one JSON document within the bounds above; raises :class:`BadDocument`.

    This is the hot path of ``prepare`` for JSON lines, so the costlier checks run only where a cheap test
    says they can find something: the depth scan past :data:`MAX_DEPTH` brackets, the walk for lone
    surrogates where a surrogate escape occurs, the search for a huge integer's place where there is one."""
    if isinstance(data, bytes):
        deep = data.count(b"[") + data.count(b"{") > MAX_DEPTH
        try:
            data = data.decode("utf-8")  # strictly: json.loads would decode bytes with surrogatepass
        except UnicodeDecodeError as exc:
            raise BadDocument(f"not valid UTF-8 (byte {exc.start + 1})", "not UTF-8") from None
    else:
        deep = data.count("[") + data.count("{") > MAX_DEPTH
    data = data.removeprefix("\ufeff")
    if deep:  # only then can it be too deep
        _check_depth(data)
    try:
        try:
            value = _DECODER.decode(data)
        except _TooLong:  # parsed again with the integers marked, so that the walk names the place
            value = _MARKING.decode(data)
            check_value(value)
    except json.JSONDecodeError as exc:
        raise BadDocument(f"not valid JSON ({exc.msg}, {_place(data, exc.pos)})", "not JSON") from None
    except RecursionError:  # not reached after the scan; kept so no parser limit can ever escape
        raise BadDocument(f"nested more than {MAX_DEPTH} deep", "too deep") from None
    if _SURROGATE_ESCAPE.search(data):  # only an escape can make a lone surrogate of UTF-8 text
        check_value(value)
    return value


def _check_depth(text: str) -> None:
    depth = 0
    for m in _TOKENS.finditer(text):
        c = text[m.start()]
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise BadDocument(f"nested more than {MAX_DEPTH} deep ({_place(text, m.start())})", "too deep")
        elif c in "]}":
            depth -= 1


def _place(text: str, pos: int) -> str:
    """Where ``pos`` is, as a person reads it (a one-line document, a JSON line, needs only the column)."""
    start = text.rfind("\n", 0, pos)
    if start < 0:
        return f"column {pos + 1}"
    return f"line {text.count(chr(10), 0, pos) + 1}, column {pos - start}"


def check_value(value: Any, root: str = "$", text: bool = True) -> None:
    """Refuse nesting past :data:`MAX_DEPTH`, the placeholders of huge integers and (with ``text``) lone
    surrogates in a parsed value (dicts, lists and tuples), naming the key path. Iterative, so it is safe on
    any value; a path is built only for containers and for what is refused."""
    if not isinstance(value, (dict, list, tuple)):  # a document that is one scalar
        try:
            check_value([value], "", text)
        except BadDocument as exc:
            raise BadDocument(str(exc).replace(" at [0]", f" at {root}"), exc.kind) from None
        return
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise BadDocument(f"nested more than {MAX_DEPTH} deep (at {_short(path)})", "too deep")
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, sub in pairs:
            if isinstance(sub, (dict, list, tuple)):
                stack.append((sub, _key_path(path, key, isinstance(item, dict)), depth + 1))
            elif isinstance(sub, _HugeInt):
                where = _key_path(path, key, isinstance(item, dict))
                raise BadDocument(
                    f"an integer of {sub.digits:,} digits at {where} (at most {MAX_INT_DIGITS})", "huge number"
                )
            elif text and isinstance(sub, str) and (problem := _bad_text(sub)):
                raise BadDocument(f"{problem} at {_key_path(path, key, isinstance(item, dict))}", "invalid text")
            if text and isinstance(key, str) and (problem := _bad_text(key)):
                raise BadDocument(f"{problem} in a key at {path}", "invalid text")


def _short(path: str) -> str:
    return path if len(path) <= 80 else f"{path[:60]}...{path[-15:]}"


def _key_path(path: str, key: object, mapping: bool = True) -> str:
    if not mapping:
        return f"{path}[{key}]"
    if isinstance(key, str) and _IDENTIFIER.match(key):
        return f"{path}.{key}"
    shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
    return f"{path}[{shown}]"


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text that is not valid Unicode (a lone surrogate U+{ord(text[exc.start]):04X})"
    return None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """A JSON file, bounded as above, or one error naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise OpenLLMError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise OpenLLMError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return parse_json(data)
    except BadDocument as exc:
        raise OpenLLMError(f"{what} {path}: {exc}") from None


def read_yaml(path: str | os.PathLike, what: str = "file", max_bytes: int = 1 << 20) -> Any:
    """A YAML file (safe types only, no anchors or aliases), bounded as above, or one error naming it."""
    import yaml

    class Bounded(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                raise _at(self.peek_event(), "anchors and aliases (& and *) are not allowed", "alias")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _at(self.peek_event(), f"nested more than {MAX_DEPTH} deep", "too deep")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_scalar(self, node):  # type: ignore[no-untyped-def]
            value = super().construct_scalar(node)
            if problem := _bad_text(value):
                raise _at(node, problem, "invalid text")
            return value

        def construct_yaml_int(self, node):  # type: ignore[no-untyped-def]
            digits = sum(c.isalnum() for c in self.construct_scalar(node))
            if digits > MAX_INT_DIGITS:
                raise _at(node, f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS})", "huge number")
            return super().construct_yaml_int(node)

    Bounded.add_constructor("tag:yaml.org,2002:int", Bounded.construct_yaml_int)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise OpenLLMError(f"{what} {path} is larger than {max_bytes >> 20} MB")
            data = f.read()
    except FileNotFoundError:
        raise OpenLLMError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise OpenLLMError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.load(data.decode("utf-8"), Loader=Bounded)  # noqa: S506 - a SafeLoader subclass
    except BadDocument as exc:
        raise OpenLLMError(f"{what} {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise OpenLLMError(f"{what} {path}: not valid UTF-8 (byte {exc.start + 1})") from None
    except yaml.YAMLError as exc:
        first = first_line(exc, "unreadable")
        raise OpenLLMError(f"{what} {path} is not valid YAML: {first}") from None


def _at(event_or_node: Any, problem: str, kind: str) -> BadDocument:
    mark = getattr(event_or_node, "start_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return BadDocument(f"{problem}{where}", kind)
