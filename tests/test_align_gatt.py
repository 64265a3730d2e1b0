"""Ghost Attention: the instruction stays in turn 1 only and the loss covers the last answer only."""

from __future__ import annotations

from llama2.align.gatt import (
    INSTRUCTIONS,
    gatt_example,
    synthetic_user_turns,
    with_instruction,
)
from llama2.chat import Llama2ChatFormat
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.train.data import encode_chat_example, encode_finished_dialog

INSTRUCTION = INSTRUCTIONS[0].text


def sampled_dialog() -> list[dict]:
    """What sampling produced: the instruction on every user turn."""
    turns = [("What is 2 plus 2?", "Ahoy, it is 4."), ("And 3 plus 3?", "Ahoy, 6."), ("And 4 plus 4?", "Ahoy! 8.")]
    dialog = []
    for question, answer in turns:
        dialog += [
            {"role": "user", "content": with_instruction(INSTRUCTION, question)},
            {"role": "assistant", "content": answer},
        ]
    return dialog


def test_instruction_is_kept_in_the_first_turn_only():
    messages = gatt_example(INSTRUCTION, sampled_dialog())["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == [with_instruction(INSTRUCTION, "What is 2 plus 2?"), "And 3 plus 3?", "And 4 plus 4?"]
    assert [m.get("train", True) for m in messages if m["role"] == "assistant"] == [False, False, True]


def test_loss_mask_covers_only_the_last_answer():
    chat_format = Llama2ChatFormat(Tokenizer.from_file(llama2_tokenizer_path()))
    messages = gatt_example(INSTRUCTION, sampled_dialog())["messages"]
    ids, mask = encode_chat_example(chat_format, messages)
    # The targets are exactly the tokens after the last answer's generation prompt: "Ahoy! 8." + EOS.
    prompt = chat_format.encode_dialog_prompt(messages[:-1])
    assert ids[: len(prompt)] == prompt
    assert not any(mask[: len(prompt)])
    assert all(mask[len(prompt) :]) and len(ids) == len(encode_finished_dialog(chat_format, messages))
    assert chat_format.tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == "Ahoy! 8."
    # Without the GAtt marks every answer would be trained (the trainer's default).
    _, plain_mask = encode_chat_example(chat_format, [{k: v for k, v in m.items() if k != "train"} for m in messages])
    assert sum(plain_mask) > sum(mask)


def test_instruction_checkers_and_synthetic_turns():
    ahoy, over, caps = INSTRUCTIONS
    assert ahoy.follows("Ahoy! The answer is 4.") and not ahoy.follows("The answer is 4. Ahoy")
    assert over.follows("It is 4. Over and out.") and not over.follows("Over and out. It is 4.")
    assert caps.follows("IT IS 4.") and not caps.follows("It is 4.") and not caps.follows("4.")
    turns = synthetic_user_turns(3, 20, seed=0)
    assert len(turns) == 3 and all(len(t) == 20 for t in turns)
