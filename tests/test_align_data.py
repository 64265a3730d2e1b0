"""Preference and prompt JSONL: clear errors for bad rows, answers encoded as the model would write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama2.align.batching import pad_sequences
from llama2.align.preferences import (
    encode_answer,
    encode_pairs,
    read_preferences,
    read_prompts,
)
from llama2.chat import Llama2ChatFormat
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path

from helpers import expect_error

FIXTURES = Path(__file__).parent / "fixtures" / "align"
GOOD = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away."}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_the_shipped_fixture_reads():
    pairs = read_preferences(FIXTURES / "pairs.jsonl")
    assert len(pairs) == 160 and any(p.prompt.safety for p in pairs) and any(p.rating == "better" for p in pairs)
    assert all(p.dialog[-1]["role"] == "user" for p in read_prompts(FIXTURES / "prompts.jsonl"))


@pytest.mark.parametrize(
    ("row", "needles"),
    [
        ("{not json", (":2:", "not valid JSON")),
        ([1, 2], (":2:", "JSON object")),
        ({**GOOD, "chosen": None}, (":2:", "missing field 'chosen'")),
        ({**GOOD, "rejected": 3}, (":2:", "'rejected'", "non-empty string")),
        ({**GOOD, "rating": "much better"}, (":2:", "'rating'", "slightly better")),
        ({**GOOD, "safety": "yes"}, (":2:", "'safety'", "true or false")),
        ({**GOOD, "prompt": [{"role": "bot", "content": "x"}]}, (":2:", "'prompt'", "message 0")),
        (
            {**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            (":2:", "end with a user message"),
        ),
    ],
)
def test_bad_rows_name_line_and_field(tmp_path, row, needles):
    path = write_rows(tmp_path / "pairs.jsonl", [GOOD, row])
    expect_error(lambda: read_preferences(path), str(path), *needles)


def test_missing_and_empty_files(tmp_path):
    expect_error(lambda: read_preferences(tmp_path / "none.jsonl"), "no such file")
    expect_error(lambda: read_preferences(write_rows(tmp_path / "empty.jsonl", ["", " "])), "no preference pairs")


@pytest.fixture(scope="module")
def chat_format():
    return Llama2ChatFormat(Tokenizer.from_file(llama2_tokenizer_path()))


def test_answer_is_the_assistant_turn_after_the_generation_prompt(chat_format):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    encoded = encode_answer(chat_format, dialog, "Hello there!")
    prompt = chat_format.encode_dialog_prompt(dialog)
    tokenizer = chat_format.tokenizer
    assert encoded.ids[: encoded.answer_start] == prompt
    assert encoded.ids[-1] == tokenizer.eos_id  # Meta's format closes an answer with EOS
    assert tokenizer.decode(encoded.ids[encoded.answer_start : -1]).strip() == "Hello there!"


def test_pairs_too_long_are_left_out(chat_format, tmp_path):
    long = {**GOOD, "chosen": "word " * 300}
    pairs = read_preferences(write_rows(tmp_path / "p.jsonl", [GOOD, long]))
    encoded, dropped = encode_pairs(chat_format, pairs, seq_len=64)
    assert len(encoded) == 1 and dropped == 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_keeps_positions_and_last_index(side):
    batch = pad_sequences([[5, 6, 7], [8]], pad_id=0, side=side)
    assert batch.tokens[range(2), batch.last_index].tolist() == [7, 8]
    real_positions = [batch.positions[r][batch.real[r]].tolist() for r in range(2)]
    assert real_positions == [[0, 1, 2], [0]]
    assert batch.tokens[1].tolist() == ([0, 0, 8] if side == "left" else [8, 0, 0])
