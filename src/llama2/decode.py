"""One request's lifecycle and the decode step that advances many, for streaming and the server.

A `GenerationRequest` is checked (`check_request`), becomes a `DecodingSequence` holding a
KV-cache slot, and is advanced by `DecodeBatch.step`: prompt chunks at fixed multiples of
the chunk size, then one token per step, every sequence whose prompt is cached decoded
together in passes of at most `ModelSteps.rows_per_pass` rows (each row computed as if
alone). Each sampled token goes through the sequence's own sampling settings and
generator, stop ids, stop strings and `TextStreamer`, giving an `Output` (new text,
log-probabilities, finish reason). `Llama.stream_tokens` runs one sequence in slot 0;
`serve.engine.Engine` runs many and adds a queue, a thread and metrics around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .backends import ModelSteps
from .errors import Llama2Error
from .sampling import SamplingParams, sample_next
from .text_stream import TextStreamer
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


class ContextLengthError(Llama2Error):
    """Prompt plus requested tokens do not fit the context (HTTP 400)."""


def check_prompt_ids(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raise `Llama2Error` unless there are prompts, none empty, every id in the vocabulary."""
    if not prompts:
        raise Llama2Error("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise Llama2Error("empty prompt: give at least one token")
    if any(not 0 <= t < vocab_size for p in prompts for t in p):
        raise Llama2Error(f"prompt token ids must be in [0, {vocab_size})")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int) -> None:
    """`check_prompt_ids`, and every prompt leaves room for at least one generated token."""
    check_prompt_ids(prompts, vocab_size)
    longest = max(len(p) for p in prompts)
    if longest >= max_seq_len:
        raise ContextLengthError(
            f"prompt has {longest} tokens but the context holds {max_seq_len} "
            f"(prompt and answer together); shorten the prompt or raise max_seq_len"
        )


def check_max_tokens(max_tokens: int, name: str = "max_gen_len") -> None:
    """Raise `Llama2Error` unless at least one token is asked for."""
    if max_tokens < 1:
        raise Llama2Error(f"{name} must be at least 1, got {max_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate.

    Attributes:
        prompt_ids: the prompt's token ids.
        max_tokens: most tokens to generate.
        sampling: temperature, top-p, top-k, repetition penalty (temperature 0 is greedy).
        seed: seed of this sequence's generator (None: a random one).
        stop_ids: token ids that end the sequence (not part of the output).
        stop: strings that end the sequence (the text is cut before them).
        top_logprobs: None for no log-probabilities; k >= 0 for the chosen token's
            log-probability plus the k most likely alternatives at every step.
        index: the choice index echoed in the sequence's events.
        prompt_logprobs: also score the prompt (`DecodingSequence.prompt_logprobs`; the
            prefill then computes the logits of every prompt position).
    """

    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: Sequence[str] = ()
    top_logprobs: int | None = None
    index: int = 0
    prompt_logprobs: bool = False


def check_request(request: GenerationRequest, vocab_size: int, max_seq_len: int) -> None:
    """Raise `Llama2Error` (`ContextLengthError` when it does not fit) if `request` cannot run.

    Unlike `Llama.generate`, which stops at the end of the context, a request must fit whole.
    """
    check_prompt_ids([request.prompt_ids], vocab_size)
    check_max_tokens(request.max_tokens, "max_tokens")
    prompt_len = len(request.prompt_ids)
    if prompt_len + request.max_tokens > max_seq_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
            f"{prompt_len + request.max_tokens} tokens ({prompt_len} in the prompt, {request.max_tokens} "
            "in the completion). Please reduce the prompt or the completion length."
        )
    if request.top_logprobs is not None and not 0 <= request.top_logprobs <= vocab_size:
        raise Llama2Error(f"top_logprobs must be in [0, {vocab_size}]")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability and the most likely alternatives.

    Attributes:
        token: the token id.
        text: the token decoded on its own.
        logprob: natural-log probability under the model (before temperature).
        top: (token id, text, logprob) of the most likely tokens, best first.
    """

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Output:
    """What one token did to a sequence.

    Attributes:
        text: newly decided text (possibly empty: held back or mid-character).
        logprobs: the token's log-probability entry, when requested.
        finish_reason: None while running; "stop" (stop token or string) or "length"
            (max_tokens or the context) at the end.
        token: the generated token, or None for a stop token (not part of the output).
    """

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    token: int | None = None


class DecodingSequence:
    """One request from its prompt to its finish, in one KV-cache slot."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, generator: torch.Generator, max_seq_len: int):
        self.request = request
        self.tokenizer = tokenizer
        self.generator = generator
        self.max_seq_len = max_seq_len
        self.streamer = TextStreamer(tokenizer, request.stop)
        self.tokens = list(request.prompt_ids)
        self.slot = -1
        self.prefilled = 0  # prompt tokens in the cache
        self.generated = 0  # tokens generated (a stop token not counted)
        self.accepted = 0  # tokens sampled (a stop token counted)
        self.finish_reason: str | None = None
        self.prompt_logprobs = [0.0]  # with request.prompt_logprobs: each prompt token's (the first has none)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        """Whether the whole prompt is in the cache (the next forward is a decode step)."""
        return self.prefilled == self.prompt_len and self.finish_reason is None

    @property
    def answer(self) -> list[int]:
        """The generated tokens (without a stop token)."""
        return self.tokens[self.prompt_len :]

    def score_prompt(self, logits: torch.Tensor, start: int) -> None:
        """Record the log-probabilities of the prompt tokens predicted by the logits of positions start..
        ([T, vocab]; the last position may predict the answer's first token, not the prompt's)."""
        targets = self.request.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        index = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]  # [T', 1]
        log_probs = torch.log_softmax(logits[: len(targets)].float(), dim=-1).gather(1, index)  # [T', 1]
        self.prompt_logprobs.extend(log_probs[:, 0].tolist())

    def accept(self, logits: torch.Tensor) -> Output:
        """Sample the next token from its logits ([vocab]) and say what it did."""
        request = self.request
        context = None
        if request.sampling.repetition_penalty != 1.0:
            context = torch.tensor([self.tokens], dtype=torch.long, device=logits.device)
        token = int(sample_next(logits[None], request.sampling, self.generator, context)[0])
        self.accepted += 1
        if token in request.stop_ids:
            return self._finish("stop", Output(self.streamer.flush()))
        logprobs = ()
        if request.top_logprobs is not None:
            previous = self.tokens[-1] if self.generated else None
            logprobs = (self._logprob(logits, token, request.top_logprobs, previous),)
        self.tokens.append(token)
        self.generated += 1
        text = self.streamer.push(token)
        if self.streamer.stopped:
            return self._finish("stop", Output(text + self.streamer.flush(), logprobs, token=token))
        if self.generated >= request.max_tokens or len(self.tokens) >= self.max_seq_len:
            return self._finish("length", Output(text + self.streamer.flush(), logprobs, token=token))
        return Output(text, logprobs, token=token)

    def _finish(self, reason: str, output: Output) -> Output:
        self.finish_reason = reason
        return Output(output.text, output.logprobs, reason, output.token)

    def _logprob(self, logits: torch.Tensor, token: int, top: int, previous: int | None) -> TokenLogprob:
        """The token's log-probability and the `top` most likely ones, as text after `previous`."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        alternatives = ()
        if top > 0:
            values, ids = torch.topk(logprobs, top)
            alternatives = tuple(
                (int(i), self._piece(previous, int(i)), float(v)) for v, i in zip(values, ids, strict=True)
            )
        return TokenLogprob(token, self._piece(previous, token), float(logprobs[token]), alternatives)

    def _piece(self, previous: int | None, token: int) -> str:
        """The text `token` adds after `previous` (so SentencePiece keeps its leading space mid-text)."""
        if previous is None:
            return self.tokenizer.decode([token])
        before = self.tokenizer.decode([previous])
        after = self.tokenizer.decode([previous, token])
        return after[len(before) :] if after.startswith(before) else self.tokenizer.decode([token])


@dataclass(frozen=True)
class StepCounts:
    """What one `DecodeBatch.step` computed: prompt tokens prefilled and rows decoded."""

    prompt_tokens: int = 0
    decoded_rows: int = 0


class DecodeBatch:
    """Advances sequences that hold KV-cache slots, one token boundary per `step`.

    Batch invariance: a sequence's tokens do not depend on what else runs. Prompt chunks
    start at fixed multiples of `prefill_chunk`, and decode attention covers each row's own
    cache length only, so greedy answers equal `Llama.chat_completion`'s (whose prefill
    uses the same chunks by default).

    Args:
        steps: the model's forwards (`ModelSteps`).
        prefill_chunk: most prompt tokens prefilled per step.
    """

    def __init__(self, steps: ModelSteps, prefill_chunk: int = PREFILL_CHUNK):
        if prefill_chunk < 1:
            raise Llama2Error("prefill_chunk must be >= 1")
        self.steps = steps
        self.prefill_chunk = prefill_chunk

    def step(self, sequences: list[DecodingSequence], report: Callable[[DecodingSequence, Output], None]) -> StepCounts:
        """Prefill a chunk (oldest sequence first), then decode one token for every sequence
        whose prompt is cached; `report` gets each sampled token's `Output` at once."""
        prompt_tokens = self._prefill(sequences, report)
        rows = [s for s in sequences if s.decoding]
        per_pass = self.steps.rows_per_pass
        for first in range(0, len(rows), per_pass):
            chunk = rows[first : first + per_pass]
            logits = self.steps.decode(
                [s.tokens[-1] for s in chunk], [len(s.tokens) - 1 for s in chunk], [s.slot for s in chunk]
            )
            for seq, row_logits in zip(chunk, logits, strict=True):
                report(seq, seq.accept(row_logits))
        return StepCounts(prompt_tokens, len(rows))

    def _prefill(self, sequences: list[DecodingSequence], report) -> int:
        """Feed up to `prefill_chunk` prompt tokens; a prompt of at most that many goes in one pass like `Llama`'s."""
        budget = self.prefill_chunk
        for seq in [s for s in sequences if s.prefilled < s.prompt_len]:
            start = seq.prefilled
            end = min(seq.prompt_len, start + self.prefill_chunk)
            if end - start > budget:
                break  # the next step has room for the whole chunk
            scoring = seq.request.prompt_logprobs
            logits = self.steps.prefill(seq.tokens[start:end], start, seq.slot, all_logits=scoring)
            if scoring:  # logits [T, vocab]
                seq.score_prompt(logits, start)
                logits = logits[-1]
            seq.prefilled, budget = end, budget - (end - start)
            if seq.prefilled == seq.prompt_len:
                report(seq, seq.accept(logits))
        return self.prefill_chunk - budget


@dataclass
class GenerationStats:
    """Timings of the last generation call (for `llama2 generate --verbose` and benchmarks).

    Attributes:
        prompt_tokens: the prompts' tokens, all together.
        generated_tokens: tokens sampled for the longest answer (a stop token counted).
        prefill_s: seconds until every sequence had its first token.
        decode_s: seconds from then to the last token.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps a second (tokens a second of each sequence)."""
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def run_in_slots(
    steps: ModelSteps, sequences: Sequence[DecodingSequence], stats: GenerationStats
) -> Iterator[list[tuple[DecodingSequence, Output]]]:
    """Run `sequences` in cache slots 0, 1, ... to their finish; yield each step's outputs.

    The decode step is the server's (`DecodeBatch`, prompt chunks of `PREFILL_CHUNK`), so
    each sequence's tokens are those it gets alone. `stats` gets the timings.
    """
    batch = DecodeBatch(steps, PREFILL_CHUNK)
    for slot, sequence in enumerate(sequences):
        sequence.slot = slot
    stats.prompt_tokens = sum(s.prompt_len for s in sequences)
    start = first_tokens_at = time.perf_counter()
    outputs: list[tuple[DecodingSequence, Output]] = []

    def collect(sequence: DecodingSequence, output: Output) -> None:
        nonlocal first_tokens_at
        outputs.append((sequence, output))
        if sequence.accepted == 1 and all(s.accepted for s in sequences):  # the prompts' time
            first_tokens_at = time.perf_counter()
            stats.prefill_s = first_tokens_at - start

    with torch.inference_mode():
        while running := [s for s in sequences if s.finish_reason is None]:
            batch.step(running, collect)
            stats.decode_s = time.perf_counter() - first_tokens_at
            stats.generated_tokens = max(s.accepted for s in sequences)
            yield list(outputs)
            outputs.clear()


def stream_alone(steps: ModelSteps, sequence: DecodingSequence, stats: GenerationStats) -> Iterator[str]:
    """Run one sequence in cache slot 0 to its finish, yielding its text pieces; `stats` gets the timings."""
    for outputs in run_in_slots(steps, [sequence], stats):
        yield from (output.text for _, output in outputs if output.text)
