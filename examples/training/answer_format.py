"""Generated chat data that teaches one fixed answer format: every reply starts with "Answer:".

Training dialogs ask simple questions whose answers the generator can compute
(arithmetic, word lengths, reversed words, days, comparisons, capitals, opposites) and
answer them as "Answer: <answer>.". Held-out prompts are new instances of those
questions plus questions of kinds never seen in training, to measure whether the format
carries over.

    python examples/training/answer_format.py OUT_DIR

writes OUT_DIR/format_train.jsonl ({"messages": [...]} per line) and OUT_DIR/format_heldout.json.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

PREFIX = "Answer:"
WORDS = [
    "garden",
    "table",
    "window",
    "rabbit",
    "pencil",
    "orange",
    "river",
    "planet",
    "basket",
    "candle",
    "silver",
    "forest",
    "yellow",
    "bridge",
    "castle",
    "winter",
    "rocket",
    "button",
    "spider",
    "island",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
}

# Kinds of questions never seen in training.
UNSEEN = [
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "What is the largest planet in our solar system?",
    "What color is grass?",
    "How many days are in a week?",
    "What language is spoken in Brazil?",
    "What do bees make?",
    "What is the freezing point of water in Celsius?",
    "Which animal is known as the king of the jungle?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What gas do plants take in from the air?",
    "Name a fruit that is yellow.",
    "What is the tallest animal?",
    "How many hours are in a day?",
    "Which ocean is the largest?",
    "What instrument has 88 keys?",
    "What is the square root of 81?",
    "Which season comes after summer?",
    "What shape has three sides?",
]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
    return rng.choice(
        [f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"Can you tell me what {a} {word} {b} is?"]
    ), str(value)


def _letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in the word '{word}'?", str(len(word))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards.", word[::-1]


def _next_day(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(7)
    return f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1, 500), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(list(CAPITALS))
    return f"What is the capital of {country}?", CAPITALS[country]


def _opposite(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(list(OPPOSITES))
    return f"What is the opposite of '{word}'?", OPPOSITES[word]


QUESTIONS: list[Callable[[random.Random], tuple[str, str]]] = [
    _arithmetic,
    _letters,
    _reverse,
    _next_day,
    _larger,
    _capital,
    _opposite,
]


def dialog(rng: random.Random) -> dict:
    question, answer = rng.choice(QUESTIONS)(rng)
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{PREFIX} {answer}."}]
    }


def write_data(folder: Path, train: int = 400, heldout_seen: int = 20) -> tuple[Path, Path]:
    """Training dialogs and held-out prompts (new instances of seen kinds, then `UNSEEN`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    train_path = folder / "format_train.jsonl"
    text = "".join(json.dumps(dialog(rng)) + "\n" for _ in range(train))
    if not train_path.exists() or train_path.read_text() != text:
        train_path.write_text(text)
    held_rng = random.Random(2)
    seen = [rng_question(held_rng) for _ in range(heldout_seen)]
    heldout_path = folder / "format_heldout.json"
    heldout_path.write_text(json.dumps({"seen_kinds": seen, "unseen_kinds": UNSEEN}, indent=1))
    return train_path, heldout_path


def rng_question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS)(rng)[0]


def follows_format(reply: str) -> bool:
    return reply.strip().startswith(PREFIX)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    for path in write_data(parser.parse_args().out_dir):
        print(path)
