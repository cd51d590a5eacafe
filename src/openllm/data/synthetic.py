"""Synthetic conversations with verifiable answers: what shows that fine-tuning taught a model to answer.

Each conversation is one user question and the assistant's answer, which is exactly right and short. The
tasks: adding and subtracting one-digit numbers (bare, or told as a story about someone's things), saying a
list of words backwards, and answering from the sentence given (a thing's color, or where someone put it).
Each task's question space is far larger than a few thousand draws (the names, things and lists vary), so
held-out questions are ones a model never saw; what it has to carry over is the skill: the sums, the order of
a list, finding the answer in the question. The same ``seed`` gives the same conversations.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator

from openllm.core.fileio import atomic_write_text

WORDS = (
    "apple", "bread", "chair", "dog", "earth", "fish", "green", "house", "island", "jump", "kite", "lemon",
    "moon", "night", "ocean", "paper", "queen", "river", "stone", "tiger", "voice", "water", "cloud", "horse",
)  # fmt: skip
NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ivy", "Jack", "Kate", "Leo")
COLORS = ("red", "blue", "green", "black", "white", "yellow", "brown", "pink")
THINGS = ("ball", "hat", "car", "book", "cup", "kite", "bag", "coat", "shoe", "lamp")
PLACES = ("box", "garden", "kitchen", "drawer", "basket", "shed", "attic", "hall", "bed", "sink")
COUNTED = ("apples", "coins", "books", "shells", "pens", "stamps", "cards", "eggs", "rocks", "cups")


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 9), r.randint(0, 9)
    if r.random() < 0.25:
        return f"What is {a} + {b}?", str(a + b)
    name, things = r.choice(NAMES), r.choice(COUNTED)
    return f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", str(a + b)


def _subtract(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randint(0, 9), r.randint(0, 9)), reverse=True)
    if r.random() < 0.25:
        return f"What is {a} - {b}?", str(a - b)
    name, things = r.choice(NAMES), r.choice(COUNTED)
    return f"{name} has {a} {things} and gives {b} away. How many {things} does {name} have left?", str(a - b)


def _reverse(r: random.Random) -> tuple[str, str]:
    words = r.sample(WORDS, 3)
    return f"Say the list {', '.join(words)} backwards.", ", ".join(reversed(words))


def _color(r: random.Random) -> tuple[str, str]:
    name, color, thing = r.choice(NAMES), r.choice(COLORS), r.choice(THINGS)
    return f"{name} has a {color} {thing}. What color is the {thing} of {name}?", color


def _place(r: random.Random) -> tuple[str, str]:
    name, thing, place = r.choice(NAMES), r.choice(THINGS), r.choice(PLACES)
    return f"{name} put the {thing} in the {place}. Where is the {thing}?", place


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "subtract": _subtract, "reverse": _reverse, "color": _color, "place": _place,
}  # fmt: skip


def tasks_and_conversations(seed: int = 0) -> Iterator[tuple[str, dict]]:
    """An endless stream of (task name, conversation ``{"messages": [user, assistant]}``), the tasks drawn
    evenly; the assistant's content is the expected answer."""
    r = random.Random(seed)
    names = list(TASKS)
    while True:
        task = r.choice(names)
        question, answer = TASKS[task](r)
        yield task, {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def conversations(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` conversations of ``tasks_and_conversations(seed)``."""
    stream = tasks_and_conversations(seed)
    return [next(stream)[1] for _ in range(n)]


def write_jsonl(path: str | os.PathLike, n: int, seed: int = 0) -> None:
    """Write ``conversations(n, seed)`` as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in conversations(n, seed)))
