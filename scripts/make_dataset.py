"""Generate the bundled pretraining corpus and instruction dataset (deterministic, no downloads).

    python scripts/make_dataset.py      # writes assets/data/{corpus.txt,train.jsonl,eval.jsonl}

corpus.txt (1.5 MB): documents separated by blank lines, made from small grammars: short
stories, arithmetic in digits and in words, counting and comparisons, numbers taken apart into
digits, tiny Python list snippets, and spelled-out words. It is the pretraining text of the
bundled tiny LLaMA.

train.jsonl (2000) and eval.jsonl (200, held out): the fine-tuning task, sorting 3 to 5 digits:
``{"prompt": "Sort the digits: 8 0 1 5", "response": "0 1 5 8"}``. Prompts are distinct, so no
eval prompt is in train. The corpus never contains the instruction (nor the chat template), so
the base model cannot do the task; the answer is a few single-digit tokens that attention can
pick out of the prompt, so a LoRA learns it in a few hundred steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = (
    "Anna", "Ben", "Mia", "Tom", "Lily", "Sam", "Nora", "Leo", "Ella", "Max",
    "Ruby", "Jack", "Zoe", "Finn", "Ivy", "Omar", "Lucy", "Hugo", "Ada", "Kai",
    "Rosa", "Eli", "Maya", "Theo", "Iris", "Noah", "Jade", "Luca", "Emma", "Otto",
)  # fmt: skip
ANIMALS = (
    "cat", "dog", "bird", "fox", "horse", "rabbit", "duck", "frog", "cow", "sheep",
    "mouse", "bear", "goat", "owl", "fish", "pig", "lion", "wolf", "hen", "bee",
    "tiger", "snake", "whale", "crab", "deer", "monkey", "turtle", "zebra", "camel", "swan",
)  # fmt: skip
THINGS = (
    "ball", "book", "cup", "hat", "box", "kite", "lamp", "key", "coat", "bag",
    "apple", "cake", "drum", "map", "ring", "shoe", "spoon", "boat", "chair", "bell",
    "clock", "pencil", "basket", "blanket", "candle", "mirror", "ladder", "bucket", "window",
    "wagon", "flower", "letter", "button", "pillow", "rope", "shell", "stone", "train",
)  # fmt: skip
PLACES = (
    "park", "river", "garden", "school", "market", "forest", "beach", "farm", "town",
    "hill", "lake", "kitchen", "library", "station", "field", "shop", "castle", "bridge",
    "island", "village", "mountain", "harbor", "museum", "bakery", "cave", "meadow",
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "grey", "orange")
ADJECTIVES = (
    "small", "big", "old", "new", "happy", "sleepy", "quiet", "loud", "fast", "slow",
    "soft", "warm", "cold", "funny", "brave", "clever", "tiny", "tall", "round", "shiny",
    "gentle", "curious", "lazy", "strange", "busy", "lucky", "noisy", "wild", "proud", "kind",
)  # fmt: skip
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "bright")
FEELINGS = ("happy", "sad", "tired", "hungry", "excited", "calm", "surprised", "proud")
ACTIONS = (
    ("run", "ran"), ("walk", "walked"), ("jump", "jumped"), ("sing", "sang"),
    ("play", "played"), ("read", "read"), ("swim", "swam"), ("dance", "danced"),
    ("sleep", "slept"), ("eat", "ate"), ("draw", "drew"), ("climb", "climbed"),
    ("paint", "painted"), ("cook", "cooked"), ("write", "wrote"), ("fly", "flew"),
    ("hide", "hid"), ("laugh", "laughed"), ("travel", "traveled"), ("build", "built"),
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
        f"{name} helped {other} sort the {thing}s by color.",
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


def digits(rng: random.Random) -> str:
    """Numbers taken apart into their digits."""
    out = []
    for _ in range(rng.randint(2, 4)):
        n = rng.randint(10, 9999)
        ds = list(str(n))
        out.append(f"The number {n} has {len(ds)} digits: {', '.join(ds[:-1])} and {ds[-1]}.")
    return " ".join(out)


def code(rng: random.Random) -> str:
    """A tiny Python snippet on a list of numbers (sum, length, first and last item)."""
    name = rng.choice(("numbers", "scores", "ages", "prices", "counts"))
    values = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
    lines = [f"{name} = [{', '.join(map(str, values))}]"]
    for expr, result in (
        (f"sum({name})", sum(values)),
        (f"len({name})", len(values)),
        (f"{name}[0]", values[0]),
        (f"{name}[-1]", values[-1]),
    ):
        if rng.random() < 0.5:
            lines.append(f"print({expr})  # {result}")
    return "\n".join(lines)


def spelling(rng: random.Random) -> str:
    """Words spelled out letter by letter."""
    words = rng.sample(ANIMALS + THINGS + COLORS, rng.randint(2, 4))
    return " ".join(f"The word {w} is spelled {' '.join(w)}." for w in words)


def corpus(rng: random.Random, n_chars: int) -> str:
    """Documents separated by blank lines until the text reaches ``n_chars`` characters."""
    makers = (story, story, story, arithmetic, counting, digits, code, spelling)
    docs, size = [], 0
    while size < n_chars:
        doc = rng.choice(makers)(rng)
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


TASK_INSTRUCTION = "Sort the digits:"


def task_example(rng: random.Random) -> dict[str, str]:
    """One instruction example of the fine-tuning task."""
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    prompt = f"{TASK_INSTRUCTION} {' '.join(map(str, digits))}"
    return {"prompt": prompt, "response": " ".join(map(str, sorted(digits)))}


def task_dataset(
    rng: random.Random, n_train: int, n_eval: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct examples (by prompt), split into train and held-out eval."""
    seen: set[str] = set()
    examples = []
    while len(examples) < n_train + n_eval:
        ex = task_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            examples.append(ex)
    return examples[:n_train], examples[n_train:]


def _write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/data", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-chars", type=int, default=1_500_000)
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--eval", type=int, default=200, help="held-out examples")
    args = parser.parse_args()

    text = corpus(random.Random(f"corpus-{args.seed}"), args.corpus_chars)
    train, held_out = task_dataset(random.Random(f"task-{args.seed}"), args.train, args.eval)
    if TASK_INSTRUCTION.lower() in text.lower() or "[INST]" in text:
        raise RuntimeError("the corpus contains the task's instruction")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    _write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    _write_jsonl(os.path.join(args.out, "eval.jsonl"), held_out)
    print(f"wrote {args.out}: corpus {len(text)} chars, {len(train)} train, {len(held_out)} eval")


if __name__ == "__main__":
    main()
