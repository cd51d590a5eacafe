"""One chat template everywhere: conversations to token ids and a loss mask.

A tokenizer's own template (``tokenizer_config.json`` ``chat_template``, as an imported Qwen3 or Llama
tokenizer has it) is used as it is; a tokenizer without one gets OpenLLM's, ChatML, and its two special
tokens (:func:`with_chat_tokens`). Templates are Jinja, rendered in a sandbox with the variables
``transformers``' ``apply_chat_template`` gives them (``messages``, ``add_generation_prompt``, the special
tokens' strings), and the rendered text is tokenized as ``transformers`` tokenizes it: each special token's
string in the template's markup is that token, the text between is encoded as a whole. So training, the
server and ``apply_chat_template`` on an export give the same ids.

Only the template's markup can make a special token: a message's content is always encoded as text (a user
who writes ``<|im_end|>`` does not end the turn). To tell content from markup, the template is rendered once
more with a unique marker in place of each content (:func:`_located`): the text between the markers is the
markup, and the real rendering must be that markup with the contents in their places.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from openllm.core.errors import OpenLLMError
from openllm.data.tokenizer import Tokenizer
from openllm.data.tokenizer.base import CHAT_TOKENS

IM_START, IM_END = CHAT_TOKENS
# ChatML: each message ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt ``<|im_start|>assistant\n``
OPENLLM_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TRAIN_ON = ("assistant", "all")  # which tokens carry loss: the assistant's (and its end of turn), or every one
_MARK = "\ue000{}\ue001"  # a content's stand-in (private-use characters, which no template changes)


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer with a chat template: ``tokenizer`` itself when it has one, else a copy with ``<|im_start|>`` and
    ``<|im_end|>`` added as special tokens after its last id (the ids it had are unchanged) and ChatML as its
    ``chat_template``. Refused by name for a tokenizer that cannot take special tokens (a character vocabulary)."""
    if tokenizer.chat_template:
        return tokenizer
    return tokenizer.with_chat_tokens(OPENLLM_CHAT_TEMPLATE)


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template in a sandboxed environment set up as ``transformers`` sets up its own."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise OpenLLMError(f"the tokenizer's chat template is not a valid Jinja template ({exc})") from None


def render(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it (the text ``apply_chat_template`` renders)."""
    from jinja2.exceptions import TemplateError

    if not tokenizer.chat_template:
        raise OpenLLMError(
            "the tokenizer has no chat template; give it one with openllm.data.chat.with_chat_tokens (OpenLLM's "
            "ChatML format and its two special tokens)"
        )
    sp = tokenizer.special
    tokens = {
        f"{r}_token": tokenizer.id_to_piece(i)
        for r in ("bos", "eos", "pad", "unk")
        if (i := getattr(sp, r)) is not None
    }
    try:
        return _compiled(tokenizer.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **tokens
        )
    except TemplateError as exc:
        raise OpenLLMError(f"the tokenizer's chat template refused this conversation ({exc})") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise OpenLLMError(f"the tokenizer's chat template failed on this conversation ({exc})") from None


def check_messages(messages) -> None:
    """One error for a conversation that is not a list of ``{role, content}`` string pairs."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise OpenLLMError("a conversation must be a non-empty list of messages")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise OpenLLMError(f"message {n} of the conversation is not a {{role, content}} pair of strings")


def _located(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool):
    """The rendered text and where each message's content lies in it ((start, end) per message)."""
    marks = [_MARK.format(j) for j in range(len(messages))]
    skeleton = render(
        tokenizer, [{**m, "content": k} for m, k in zip(messages, marks, strict=True)], add_generation_prompt
    )
    text = render(tokenizer, messages, add_generation_prompt)
    markup, pos = [], 0
    for j, k in enumerate(marks):
        i = skeleton.find(k, pos)
        if i < 0 or skeleton.count(k) != 1:
            raise _unlocatable(j)
        markup.append(skeleton[pos:i])
        pos = i + len(k)
    markup.append(skeleton[pos:])
    regions, at = [], 0
    for j, m in enumerate(messages):
        if not text.startswith(markup[j], at):
            raise _unlocatable(j)
        at += len(markup[j])
        c, after = m["content"], markup[j + 1]
        last = j + 1 == len(messages)
        # (some templates trim contents: Llama 3's does)
        for shown in dict.fromkeys((c, c.strip(), c.lstrip("\n"), c.rstrip())):
            if text.startswith(shown, at) and (
                text[at + len(shown) :] == after if last else text.startswith(after, at + len(shown))
            ):
                break
        else:
            raise _unlocatable(j)
        regions.append((at, at + len(shown)))
        at += len(shown)
    return text, regions


def _unlocatable(j: int) -> OpenLLMError:
    return OpenLLMError(
        f"the tokenizer's chat template leaves out, changes or repeats the content of message {j + 1}, so its tokens "
        "cannot be told from the template's markup (OpenLLM needs a template that writes each content once, as given)"
    )


@lru_cache(maxsize=16)
def _special_pattern(pieces: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))) if pieces else None


def _tokenize(tokenizer: Tokenizer, text: str, regions: list[tuple[int, int]]):
    """Ids of the rendered text, each token's character span and whether it is a special token: special-token
    strings in the markup are their ids, the text between (contents included) is encoded as text."""
    specials = tokenizer.special_pieces()
    pattern = _special_pattern(tuple(specials))
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    special: list[bool] = []
    chunk = 0

    def flush(end: int) -> None:
        if end > chunk:
            got, offsets = tokenizer.encode_offsets(text[chunk:end])
            ids.extend(got)
            spans.extend((chunk + a, chunk + b) for a, b in offsets)
            special.extend([False] * len(got))

    pos = 0
    for start, end in [*regions, (len(text), len(text))]:
        if pattern is not None:
            for m in pattern.finditer(text, pos, start):  # markup only: a match never reaches into a content
                flush(m.start())
                ids.append(specials[m.group()])
                spans.append(m.span())
                special.append(True)
                chunk = m.end()
        pos = end
    flush(len(text))
    return ids, spans, special


def _encode(tokenizer, messages, add_generation_prompt: bool, train_on: str):
    if train_on not in TRAIN_ON:
        raise OpenLLMError(f"unknown train_on {train_on!r}; use one of {', '.join(TRAIN_ON)}")
    check_messages(messages)
    text, regions = _located(tokenizer, messages, add_generation_prompt)
    ids, spans, special = _tokenize(tokenizer, text, regions)
    if train_on == "all":
        return ids, [True] * len(ids), special
    mask = [False] * len(ids)
    ends = [e for _, e in spans]
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        a, b = regions[j]
        limit = regions[j + 1][0] if j + 1 < len(messages) else len(text)
        k = bisect_right(ends, a)  # the first token that ends inside the content (or after it)
        while k < len(ids) and spans[k][0] < b:
            mask[k] = True
            k += 1
        # the end of the turn: the markup up to and including the first special token after the content
        first = k
        while k < len(ids) and spans[k][0] < limit and not special[k]:
            k += 1
        if k < len(ids) and spans[k][0] < limit:
            mask[first : k + 1] = [True] * (k + 1 - first)
    return ids, mask, special


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    train_on: str = "assistant",
) -> tuple[list[int], list[bool]]:
    """The conversation's ids, rendered with the tokenizer's chat template, and its loss mask: True on each assistant
    content's tokens and the end of its turn (through the first special token after it, e.g. ``<|im_end|>``), or on
    every token with ``train_on="all"``. ``add_generation_prompt`` appends the assistant's header (a prompt for
    generation: ``render`` + these ids are what the server feeds the model)."""
    ids, mask, _ = _encode(tokenizer, messages, add_generation_prompt, train_on)
    return ids, mask


def end_of_turn_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids generation stops at: the special token the chat template ends an assistant's turn with (``<|im_end|>``
    for ChatML and Qwen, ``<|eot_id|>`` for Llama 3), and the tokenizer's eos."""
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    if not tokenizer.chat_template:
        return stop
    probe = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    ids, mask, special = _encode(tokenizer, probe, False, "assistant")
    turn = [i for i, m, s in zip(ids, mask, special, strict=True) if m and s]
    return stop | set(turn[:1])
