"""Answers sampled from a policy through the batched generation engine (`llama2.generation.Llama`).

A training `Transformer` (LoRA adapters included) is wrapped in `Llama` for sampling and
handed back without caches (`policy_sampler`), so PPO samples from exactly the weights it
trains; rejection sampling can also use `Llama.build` on any checkpoint (the native CPU
engine for GGUF files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from ..chat import ChatFormat
from ..generation import Llama
from ..tokenizer import Tokenizer
from .preferences import encode_answer


@dataclass(frozen=True)
class Answer:
    """One sampled answer: its tokens (without the closing stop token), text, and whether it closed."""

    ids: list[int]
    text: str
    finished: bool


def closing_id(chat_format: ChatFormat) -> int:
    """The token the format closes an assistant answer with (EOS for Llama 2, <|im_end|> for ChatML ...)."""
    return encode_answer(chat_format, [{"role": "user", "content": "?"}], "ok").ids[-1]


@contextlib.contextmanager
def policy_sampler(
    model: nn.Module, tokenizer: Tokenizer, chat_format: ChatFormat, max_seq_len: int, max_batch_size: int, seed: int
) -> Iterator[Llama]:
    """`Llama` around a training model (eval mode, KV caches) for the block; caches removed and the
    model's training mode restored after it."""
    was_training = model.training
    model.eval()
    llama = Llama(model, tokenizer, chat_format, max_seq_len, max_batch_size, seed=seed, native=False)
    try:
        yield llama
    finally:
        model.clear_caches()
        model.train(was_training)


def sample_answers(
    llama: Llama,
    dialogs: Sequence[list[dict]],
    samples: int,
    max_gen_len: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[Answer]]:
    """`samples` answers to each dialog, generated in batches of `llama.max_batch_size` rows.

    Returns:
        Per dialog, its answers in generation order.
    """
    chat_format = llama.chat_format
    prompts = [chat_format.encode_dialog_prompt(d) for d in dialogs]
    rows = [p for p in prompts for _ in range(samples)]  # each prompt `samples` times in a row
    answers: list[Answer] = []
    for first in range(0, len(rows), llama.max_batch_size):
        chunk = rows[first : first + llama.max_batch_size]
        chunk_seed = None if seed is None else seed + first
        outputs, _ = llama.generate(
            chunk, max_gen_len, temperature, top_p, stop_ids=chat_format.stop_ids, seed=chunk_seed
        )
        for prompt, ids in zip(chunk, outputs):
            limit = min(max_gen_len, llama.max_seq_len - len(prompt))
            answers.append(Answer(ids, llama.tokenizer.decode(ids), finished=len(ids) < limit))
    return [answers[i * samples : (i + 1) * samples] for i in range(len(dialogs))]


def best_of(scores: Sequence[Sequence[float]]) -> list[int]:
    """The index of the highest score in each group (the first one on ties)."""
    return [max(range(len(group)), key=group.__getitem__) for group in scores]
