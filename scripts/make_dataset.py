"""Generate the bundled pretraining corpus and instruction dataset (deterministic, no downloads).

    python scripts/make_dataset.py            # writes assets/data/{corpus.txt,train,eval.jsonl}

corpus.txt: documents separated by blank lines, made from small grammars: short stories,
arithmetic written in digits and in words, counting, comparisons and spelled-out words. It is the
pretraining text of the bundled tiny LLaMA.

train/eval.jsonl: the fine-tuning task, TASK_DESCRIPTION below. The corpus never contains the
task's instruction nor any sorted-digit answer in that form, so the base model cannot do it.
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = (
    "Anna", "Ben", "Mia", "Tom", "Lily", "Sam", "Nora", "Leo", "Ella", "Max",
    "Ruby", "Jack", "Zoe", "Finn", "Ivy", "Omar", "Lucy", "Hugo", "Ada", "Kai",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "bird", "fox", "horse", "rabbit", "duck", "frog", "cow", "sheep",
    "mouse", "bear", "goat", "owl", "fish", "pig", "lion", "wolf", "hen", "bee",
)  # fmt: skip
THINGS = (
    "ball", "book", "cup", "hat", "box", "kite", "lamp", "key", "coat", "bag",
    "apple", "cake", "drum", "map", "ring", "shoe", "spoon", "boat", "chair", "bell",
)  # fmt: skip
PLACES = (
    "park", "river", "garden", "school", "market", "forest", "beach", "farm", "town",
    "hill", "lake", "kitchen", "library", "station", "field", "shop",
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "grey", "orange")
ADJECTIVES = (
    "small", "big", "old", "new", "happy", "sleepy", "quiet", "loud", "fast", "slow",
    "soft", "warm", "cold", "funny", "brave", "clever", "tiny", "tall", "round", "shiny",
)  # fmt: skip
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "bright")
FEELINGS = ("happy", "sad", "tired", "hungry", "excited", "calm", "surprised", "proud")
ACTIONS = (
    ("run", "ran"), ("walk", "walked"), ("jump", "jumped"), ("sing", "sang"),
    ("play", "played"), ("read", "read"), ("swim", "swam"), ("dance", "danced"),
    ("sleep", "slept"), ("eat", "ate"), ("draw", "drew"), ("climb", "climbed"),
)  # fmt: skip
ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000 ("three hundred forty-two")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _sentence(rng: random.Random, name: str, other: str) -> str:
    animal, thing, place = rng.choice(ANIMALS), rng.choice(THINGS), rng.choice(PLACES)
    adj, color, (verb, past) = rng.choice(ADJECTIVES), rng.choice(COLORS), rng.choice(ACTIONS)
    forms = (
        f"{name} has a {adj} {animal}.",
        f"The {animal} is {color}.",
        f"{name} went to the {place} with {other}.",
        f"At the {place}, {name} saw a {adj} {color} {thing}.",
        f"{name} gave the {thing} to {other}.",
        f"The {thing} was under the {rng.choice(THINGS)}.",
        f"{name} likes to {verb}, but {other} likes to {rng.choice(ACTIONS)[0]}.",
        f"It was a {rng.choice(WEATHER)} day at the {place}.",
        f'{name} said, "I can see a {adj} {animal}!"',
        f"Then {name} {past} to the {place}.",
        f"{other} felt {rng.choice(FEELINGS)} because the {animal} {past}.",
        f"{name} and {other} {past} all day.",
        f"The {adj} {animal} wanted a {color} {thing}.",
        f'"Where is my {thing}?" asked {name}.',
        f"{name} found {rng.randint(2, 9)} {thing}s in the {place}.",
    )
    return rng.choice(forms)


def story(rng: random.Random) -> str:
    """A short story of three to seven loosely connected sentences."""
    name, other = rng.sample(NAMES, 2)
    first = f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)} "
    first += f"called {name}."
    body = [_sentence(rng, *rng.sample((name, other), 2)) for _ in range(rng.randint(2, 6))]
    return " ".join([first, *body])


def arithmetic(rng: random.Random) -> str:
    """Lines of sums, differences and products in digits or in words."""
    lines = []
    for _ in range(rng.randint(3, 8)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        kind = rng.randrange(5)
        if kind == 0:
            lines.append(f"{a} + {b} = {a + b}")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}")
        elif kind == 2:
            a, b = a % 13, b % 13
            lines.append(f"{a} times {b} is {a * b}.")
        elif kind == 3:
            lines.append(f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}.")
        else:
            lines.append(f"The number {a} is written {number_words(a)}.")
    return "\n".join(lines)


def counting(rng: random.Random) -> str:
    """Counting up or down, and comparisons of two numbers."""
    start, n = rng.randint(0, 90), rng.randint(4, 9)
    if rng.random() < 0.5:
        seq = [str(start + i) for i in range(n)]
        text = f"{rng.choice(NAMES)} counted: " + ", ".join(seq) + "."
    else:
        seq = [str(start + n - i) for i in range(n)]
        text = f"Counting down from {seq[0]}: " + ", ".join(seq) + "."
    a, b = rng.sample(range(100), 2)
    word = "more" if a > b else "less"
    return text + f" {a} is {word} than {b}."


def spelling(rng: random.Random) -> str:
    """Words spelled out letter by letter."""
    words = rng.sample(ANIMALS + THINGS + COLORS, rng.randint(2, 4))
    return " ".join(f"The word {w} is spelled {' '.join(w)}." for w in words)


def corpus(rng: random.Random, n_bytes: int) -> str:
    """Documents separated by blank lines until the text reaches ``n_bytes`` characters."""
    makers = (story, story, story, arithmetic, counting, spelling)
    docs, size = [], 0
    while size < n_bytes:
        doc = rng.choice(makers)(rng)
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"
