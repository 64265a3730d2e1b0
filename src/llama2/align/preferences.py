"""Preference pairs and prompt sets: JSONL reading with clear errors, and tokenization in the chat format.

A preference line is::

    {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "...",
     "rating": "significantly better" | "better" | "slightly better" | "negligibly better",  (optional)
     "safety": true | false}                                                                (optional)

and a prompt line (rejection sampling, PPO, context distillation) is
``{"prompt": [messages], "safety": bool?, "category": "..."?}`` (a risk category).
The prompt is a dialog that ends with a user turn; each answer is encoded as the
assistant's turn after it, exactly as the model would produce it (`encode_answer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chat import ChatFormat
from ..errors import Llama2Error
from ..train.data import _common_prefix_len, encode_finished_dialog

RATINGS = ("significantly better", "better", "slightly better", "negligibly better")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """A dialog to answer (ending with a user turn), whether it is safety-tagged, and its risk category."""

    dialog: list[dict]
    safety: bool = False
    category: str | None = None


@dataclass(frozen=True)
class PreferencePair:
    """Two answers to one prompt, the chosen one preferred by `rating` (None: unrated)."""

    prompt: Prompt
    chosen: str
    rejected: str
    rating: str | None = None


@dataclass(frozen=True)
class EncodedAnswer:
    """Token ids of prompt + answer; ids[answer_start:] are the answer's (ending with its end-of-turn)."""

    ids: list[int]
    answer_start: int


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized preference pair."""

    chosen: EncodedAnswer
    rejected: EncodedAnswer
    rating: str | None
    safety: bool


# ---------------------------------------------------------------------------- reading


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-blank line of a JSONL file; `where` is "FILE:LINE"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise Llama2Error(f"{path}: cannot read ({error})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise Llama2Error(f"{where}: not valid JSON ({error.msg})") from None


def _field(row: object, name: str, where: str, kind: type, required: bool = True):
    if not isinstance(row, dict):
        raise Llama2Error(f"{where}: each line must be a JSON object")
    if name not in row or row[name] is None:
        if required:
            raise Llama2Error(f"{where}: missing field '{name}'")
        return None
    value = row[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        expected = {str: "a non-empty string", bool: "true or false", list: "a list of messages"}[kind]
        raise Llama2Error(f"{where}: field '{name}' must be {expected}")
    return value


def _prompt(row: dict, where: str) -> Prompt:
    dialog = _field(row, "prompt", where, list)
    for k, message in enumerate(dialog):
        valid = isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
        if not valid:
            raise Llama2Error(
                f'{where}: field \'prompt\' message {k} must be {{"role": system|user|assistant, "content": "..."}}'
            )
    if not dialog or dialog[-1]["role"] != "user":
        raise Llama2Error(f"{where}: field 'prompt' must end with a user message")
    messages = [{"role": m["role"], "content": m["content"]} for m in dialog]
    return Prompt(messages, bool(_field(row, "safety", where, bool, False)), _field(row, "category", where, str, False))


def read_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """The preference pairs of a JSONL file (see the module docstring).

    Raises:
        Llama2Error: a missing file or a bad line (with its file, line number and field).
    """
    pairs = []
    for where, row in _json_lines(path):
        prompt = _prompt(row, where)
        chosen, rejected = _field(row, "chosen", where, str), _field(row, "rejected", where, str)
        rating = _field(row, "rating", where, str, required=False)
        if rating is not None and rating not in RATINGS:
            raise Llama2Error(f"{where}: field 'rating' must be one of {', '.join(RATINGS)} (got {rating!r})")
        pairs.append(PreferencePair(prompt, chosen, rejected, rating))
    if not pairs:
        raise Llama2Error(f"{path}: no preference pairs")
    return pairs


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """The prompts of a JSONL file of {"prompt": [messages], "safety": bool?} lines."""
    prompts = [_prompt(row, where) for where, row in _json_lines(path)]
    if not prompts:
        raise Llama2Error(f"{path}: no prompts")
    return prompts


def read_preference_files(paths: Sequence[str | os.PathLike]) -> list[PreferencePair]:
    return [pair for path in paths for pair in read_preferences(path)]


# ---------------------------------------------------------------------------- tokenizing


def encode_answer(chat_format: ChatFormat, dialog: list[dict], answer: str) -> EncodedAnswer:
    """The ids of `dialog` answered by `answer` as the assistant's turn (closed by its end-of-turn token).

    The answer starts where the format's generation prompt for `dialog` ends, so the ids
    are what the model sees when it writes that answer itself.
    """
    prompt_ids = chat_format.encode_dialog_prompt(dialog)
    ids = encode_finished_dialog(chat_format, [*dialog, {"role": "assistant", "content": answer}])
    start = _common_prefix_len(prompt_ids, ids)
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] in chat_format.stop_ids), len(ids))
    return EncodedAnswer(ids[:end], start)


def encode_pairs(
    chat_format: ChatFormat, pairs: Sequence[PreferencePair], seq_len: int
) -> tuple[list[EncodedPair], int]:
    """Tokenize pairs; those with an answer longer than `seq_len` tokens in all are left out.

    Returns:
        (encoded pairs, how many were left out).
    """
    encoded, dropped = [], 0
    for pair in pairs:
        chosen = encode_answer(chat_format, pair.prompt.dialog, pair.chosen)
        rejected = encode_answer(chat_format, pair.prompt.dialog, pair.rejected)
        if max(len(chosen.ids), len(rejected.ids)) > seq_len or chosen.answer_start >= len(chosen.ids):
            dropped += 1
            continue
        encoded.append(EncodedPair(chosen, rejected, pair.rating, pair.prompt.safety))
    return encoded, dropped
