"""A generated corpus of tiny stories for the pretraining demo (no download, deterministic).

Each story introduces a child, a pet and an object, and refers back to them, so a model
can learn both the grammar and to copy names and colours from earlier in the text:

    Mia had a small cat named Pip. One sunny morning, Mia and Pip went to the park.
    At the park, Mia found a red kite. "Look, Pip!" said Mia. Pip looked at the red
    kite and wagged happily. ...

    python examples/training/stories.py OUT_DIR [--train 4000] [--val 200]

writes OUT_DIR/stories_train.jsonl and OUT_DIR/stories_val.jsonl ({"text": ...} per line;
different seeds, so validation stories are unseen).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHILDREN = ["Mia", "Tom", "Lily", "Ben", "Zoe", "Sam", "Ava", "Leo", "Ella", "Max", "Nora", "Finn"]
PETS = [("cat", "purred"), ("dog", "wagged its tail"), ("bird", "sang"), ("rabbit", "hopped"), ("duck", "quacked")]
PET_NAMES = ["Pip", "Rex", "Coco", "Bo", "Sunny", "Tiny", "Milo", "Daisy"]
SIZES = ["small", "big", "little", "fluffy", "happy"]
PLACES = ["park", "garden", "beach", "forest", "lake", "farm", "hill"]
WEATHER = ["sunny", "rainy", "windy", "quiet", "cold", "warm"]
TIMES = ["morning", "afternoon", "evening", "day"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white"]
THINGS = ["kite", "ball", "box", "hat", "shell", "stone", "cup", "book", "boat", "key"]
FEELINGS = ["happy", "proud", "excited", "surprised", "glad"]
ENDINGS = [
    "Then they went home for dinner.",
    "Then they sat down and watched the sky.",
    "That night, {child} dreamed about the {colour} {thing}.",
    "It was the best {time} ever.",
]


def story(rng: random.Random) -> str:
    """One story of five to eight sentences."""
    child, pet_name = rng.choice(CHILDREN), rng.choice(PET_NAMES)
    pet, pet_action = rng.choice(PETS)
    place, colour, thing = rng.choice(PLACES), rng.choice(COLOURS), rng.choice(THINGS)
    time_of_day, feeling = rng.choice(TIMES), rng.choice(FEELINGS)
    sentences = [
        f"{child} had a {rng.choice(SIZES)} {pet} named {pet_name}.",
        f"One {rng.choice(WEATHER)} {time_of_day}, {child} and {pet_name} went to the {place}.",
        f"At the {place}, {child} found a {colour} {thing}.",
        f'"Look, {pet_name}!" said {child}.',
        f"{pet_name} looked at the {colour} {thing} and {pet_action}.",
    ]
    if rng.random() < 0.5:
        other = rng.choice([c for c in CHILDREN if c != child])
        sentences += [f"Then {other} came to the {place}.", f"{child} gave the {colour} {thing} to {other}."]
        sentences.append(f"{other} felt {feeling}.")
    else:
        sentences.append(f"{child} felt {feeling} and took the {colour} {thing} home.")
    sentences.append(rng.choice(ENDINGS).format(child=child, colour=colour, thing=thing, time=time_of_day))
    return " ".join(sentences)


def write_stories(path: Path, count: int, seed: int) -> Path:
    """`count` stories as JSONL; the file is left as it is when it already holds exactly them."""
    rng = random.Random(seed)
    text = "".join(json.dumps({"text": story(rng)}) + "\n" for _ in range(count))
    if not path.exists() or path.read_text() != text:  # keep the mtime: prepared data stays valid
        path.write_text(text)
    return path


def write_corpus(folder: Path, train: int = 4000, val: int = 200) -> tuple[Path, Path]:
    """The demo's training and validation files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_stories(folder / "stories_train.jsonl", train, seed=1), write_stories(
        folder / "stories_val.jsonl", val, seed=2
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=200)
    options = parser.parse_args()
    for path in write_corpus(options.out_dir, options.train, options.val):
        print(path)
