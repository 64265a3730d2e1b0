"""Ghost Attention (GAtt), Llama 2 section 3.3: multi-turn consistency of a first-turn instruction.

Data construction (`build_gatt_examples`): for each multi-turn dialog of user messages, the
answers are sampled with the instruction attached to *every* user turn; the training
example then keeps the instruction in the first user turn only, and its loss covers only
the last answer (earlier answers are marked ``"train": false``, so the SFT loss mask zeroes
every earlier turn's tokens, assistant messages included). `llama2 align gatt` builds the
examples with the policy, fine-tunes on them with the trainer's SFT, and measures
`adherence`: per turn, the share of dialogs whose answer still follows an instruction
given in turn 1 only (instructions come with a checker, e.g. "start every answer with Ahoy").
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .sampling import sample_answers


@dataclass(frozen=True)
class Instruction:
    """An instruction to keep for the whole dialog, and a check of one answer against it."""

    text: str
    follows: Callable[[str], bool]


INSTRUCTIONS = (
    Instruction("Always start your answer with the word 'Ahoy'.", lambda a: a.strip().lower().startswith("ahoy")),
    Instruction("Always end your answer with the words 'Over and out.'", lambda a: a.strip().endswith("Over and out.")),
    Instruction("Always answer in capital letters only.", lambda a: any(c.isalpha() for c in a) and a.upper() == a),
)


def with_instruction(instruction: str, message: str) -> str:
    return f"{instruction} {message}"


def sample_gatt_dialogs(
    llama, instruction: str, user_turns: Sequence[Sequence[str]], max_gen_len: int, temperature: float, seed: int
) -> list[list[dict]]:
    """Dialogs answered turn by turn with `instruction` attached to every user message (all dialogs
    advance together, one batched generation per turn)."""
    dialogs: list[list[dict]] = [[] for _ in user_turns]
    for turn in range(max(len(turns) for turns in user_turns)):
        active = [k for k, turns in enumerate(user_turns) if turn < len(turns)]
        for k in active:
            dialogs[k].append({"role": "user", "content": with_instruction(instruction, user_turns[k][turn])})
        answers = sample_answers(llama, [dialogs[k] for k in active], 1, max_gen_len, temperature, seed=seed + turn)
        for k, group in zip(active, answers):
            dialogs[k].append({"role": "assistant", "content": group[0].text})
    return dialogs


def gatt_example(instruction: str, sampled: list[dict]) -> dict:
    """The training example of a sampled dialog: the instruction kept in the first user turn
    only, every answer but the last marked "train": false."""
    messages, first_user = [], True
    last_answer = max(i for i, m in enumerate(sampled) if m["role"] == "assistant")
    prefix = with_instruction(instruction, "")
    for i, message in enumerate(sampled):
        content = message["content"]
        if message["role"] == "user":
            content = content if first_user else content.removeprefix(prefix)
            first_user = False
        entry = {"role": message["role"], "content": content}
        if message["role"] == "assistant" and i != last_answer:
            entry["train"] = False
        messages.append(entry)
    return {"messages": messages}


def synthetic_user_turns(dialogs: int, turns: int, seed: int) -> list[list[str]]:
    """Multi-turn user messages from the synthetic factual questions."""
    from .synthetic import FACTS

    rng = random.Random(seed)
    return [[rng.choice(FACTS)[0] for _ in range(turns)] for _ in range(dialogs)]


def adherence(
    llama, instruction: Instruction, user_turns: Sequence[Sequence[str]], max_gen_len: int, seed: int = 0
) -> list[float]:
    """Per turn, the share of dialogs whose greedy answer follows `instruction`, given in turn 1 only."""
    dialogs: list[list[dict]] = [[] for _ in user_turns]
    turns = len(user_turns[0])
    rates = []
    for turn in range(turns):
        for k, dialog in enumerate(dialogs):
            text = user_turns[k][turn]
            dialog.append({"role": "user", "content": with_instruction(instruction.text, text) if turn == 0 else text})
        answers = sample_answers(llama, dialogs, 1, max_gen_len, temperature=0.0, seed=seed)
        followed = 0
        for dialog, group in zip(dialogs, answers):
            dialog.append({"role": "assistant", "content": group[0].text})
            followed += instruction.follows(group[0].text)
        rates.append(followed / len(dialogs))
    return rates


def write_examples(path: Path, examples: list[dict]) -> Path:
    from ..weights.common import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        temp.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def run_gatt(config) -> dict:
    """`llama2 align gatt`: adherence of the policy, GAtt examples sampled from it, SFT on them,
    adherence of the result; returns {"before": [...], "after": [...]} (also RUN/adherence.json)."""
    from ..generation import Llama
    from ..train.data import write_json_atomic
    from ..train.trainer import run_training
    from .plots import SFT_PLOTS, plot_stage

    out = Path(config.output_dir)
    instruction = INSTRUCTIONS[config.instruction]
    eval_turns = synthetic_user_turns(config.adherence_dialogs, config.adherence_turns, config.seed + 1)
    result_path = out / "adherence.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}

    def build(source: str):
        return Llama.build(
            source,
            config.tokenizer,
            config.adherence_seq_len,
            max(config.dialogs, config.adherence_dialogs),
            config.seed,
            device=config.device,
            chat_format=config.chat_format,
        )

    examples_path = out / "gatt" / "examples.jsonl"
    if "before" not in result or not examples_path.is_file():
        llama = build(config.model)
        result["before"] = adherence(llama, instruction, eval_turns, config.max_gen_len, config.seed)
        turns = synthetic_user_turns(config.dialogs, config.turns, config.seed)
        sampled = sample_gatt_dialogs(
            llama, instruction.text, turns, config.max_gen_len, config.temperature, config.seed
        )
        write_examples(examples_path, [gatt_example(instruction.text, d) for d in sampled])
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result_path, result)
        del llama
    run_training(config.sft_config([str(examples_path)]))
    plot_stage(out, SFT_PLOTS)
    result["after"] = adherence(build(str(out / "final")), instruction, eval_turns, config.max_gen_len, config.seed)
    write_json_atomic(result_path, result)
    return result
