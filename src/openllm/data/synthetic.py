"""Synthetic conversations with verifiable answers: what shows that fine-tuning taught a model to answer.

Each conversation is one user question and the assistant's answer, which is exactly right and short enough
for a tiny model to learn: adding or subtracting small numbers, reversing or spelling a word, and answering
from a given sentence. The same ``seed`` gives the same conversations.
"""

from __future__ import annotations

import json
import os
import random

from openllm.core.fileio import atomic_write_text

WORDS = (
    "apple", "bread", "chair", "dog", "earth", "fish", "green", "house", "island", "jump", "kite", "lemon",
    "moon", "night", "ocean", "paper", "queen", "river", "stone", "tiger", "under", "voice", "water", "yellow",
)  # fmt: skip
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ivy", "Jack")
COLORS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink")
THINGS = ("ball", "hat", "car", "book", "cup", "kite", "bag", "coat")
PLACES = ("box", "garden", "kitchen", "car", "drawer", "basket", "shed", "attic")


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 50), r.randint(0, 50)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randint(0, 50), r.randint(0, 50)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Reverse the word '{w}'.", w[::-1]


def _spell(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"Spell the word '{w}'.", "-".join(w)


def _color(r: random.Random) -> tuple[str, str]:
    name, color, thing = r.choice(NAMES), r.choice(COLORS), r.choice(THINGS)
    return f"{name} has a {color} {thing}. What color is the {thing} of {name}?", color


def _place(r: random.Random) -> tuple[str, str]:
    thing, place = r.choice(THINGS), r.choice(PLACES)
    return f"The {thing} is in the {place}. Where is the {thing}?", place


TASKS = {"add": _add, "subtract": _subtract, "reverse": _reverse, "spell": _spell, "color": _color, "place": _place}


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations ``{"messages": [user, assistant]}``; the assistant's content is the expected answer."""
    r = random.Random(seed)
    tasks = list(TASKS.values())
    out = []
    for _ in range(n):
        question, answer = r.choice(tasks)(r)
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def write_jsonl(path: str | os.PathLike, n: int, seed: int = 0) -> None:
    """Write ``conversations(n, seed)`` as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in conversations(n, seed)))
