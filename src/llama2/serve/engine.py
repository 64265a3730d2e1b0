"""Continuous batching: one worker thread owns the model and advances every request.

Requests wait in a bounded queue until one of the `max_batch_size` KV-cache slots is
free. Each engine step (a token boundary) drops cancelled sequences, admits waiting
ones, prefills at most `prefill_chunk` prompt tokens (so a long prompt delays the
running sequences by one chunk per step, not by its whole length), then decodes one
token for every sequence whose prompt is in the cache, in one batched forward pass with
per-row positions, cache slots and cache lengths. Every sequence keeps its own sampling
settings, seeded generator, stop tokens and stop strings; its text pieces go to the
request's `sink` (thread-safe, e.g. `loop.call_soon_threadsafe` onto an asyncio queue).

Batch invariance: a sequence's tokens do not depend on what else runs. Prompt chunks
start at fixed multiples of `prefill_chunk`, and decode attention covers each row's own
cache length only (`Transformer.forward` with per-row `kv_len`: bitwise row-invariant;
the linear layers are row-independent), so greedy answers equal `Llama.chat_completion`'s
(whose prefill uses the same chunks by default).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import Llama2Error
from ..generation import PREFILL_CHUNK, Llama, TextStreamer
from ..quant import DENSE_MIN_ROWS
from ..sampling import SamplingParams, sample_next
from .metrics import ServerMetrics

__all__ = [
    "ContextLengthError",
    "Engine",
    "EngineClosedError",
    "Event",
    "GenerationRequest",
    "QueueFullError",
    "Ticket",
    "TokenLogprob",
]

logger = logging.getLogger(__name__)

# Llama's own prefill chunk: a prompt is split exactly as `Llama` splits it, so greedy
# answers equal `Llama.chat_completion`'s at any prompt length.
DEFAULT_PREFILL_CHUNK = PREFILL_CHUNK
# int4 layers switch from their packed kernel to a dense GEMM at DENSE_MIN_ROWS rows; a
# decode pass stays below it, so each row computes exactly as in a batch of one.
DECODE_ROWS_PER_PASS = DENSE_MIN_ROWS - 1
_SEED_MODULUS = 1 << 64


class QueueFullError(Llama2Error):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class EngineClosedError(Llama2Error):
    """The engine is not running or shutting down (HTTP 503)."""


class ContextLengthError(Llama2Error):
    """Prompt plus requested tokens do not fit the context (HTTP 400)."""


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
    """

    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: Sequence[str] = ()
    top_logprobs: int | None = None
    index: int = 0


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
class Event:
    """What one engine step produced for one sequence.

    Attributes:
        index: the sequence's choice index.
        text: newly decided text (possibly empty: held back or mid-character).
        logprobs: the tokens generated since the last event, when requested.
        finish_reason: None while running; "stop" (stop token or string), "length"
            (max_tokens or the context) or "error" at the end.
        error: what went wrong, for finish_reason "error".
        completion_tokens: tokens generated so far (excluding a stop token).
    """

    index: int
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0


class Ticket:
    """A handle on submitted sequences; `cancel` frees their slots at the next token boundary.

    Args:
        sink: called (from the engine thread) with every `Event` of the sequences.
        size: how many sequences the ticket covers.
    """

    def __init__(self, sink: Callable[[Event], None], size: int):
        self.sink = sink
        self.size = size
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating for these sequences (safe from any thread, idempotent)."""
        self.cancelled = True


@dataclass(eq=False)
class _Sequence:
    """Engine-thread state of one sequence."""

    request: GenerationRequest
    ticket: Ticket
    streamer: TextStreamer
    generator: torch.Generator
    submitted_at: float
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    prefilled: int = 0
    generated: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len


class Engine:
    """Continuous-batching generation over a `Llama`'s model and KV caches.

    The model, its caches and every sequence belong to the thread running the loop (a
    worker thread from `start`, or the caller of `run`) until `stop`; `submit` and
    `Ticket.cancel` are safe from any thread.

    Args:
        llama: the loaded model; its `max_batch_size` is the number of KV-cache slots and
            its `max_seq_len` the context of every slot.
        max_queue: most sequences waiting for a slot; beyond it `submit` raises
            `QueueFullError`.
        prefill_chunk: most prompt tokens prefilled per step.
        metrics: where to count tokens and latencies (a fresh `ServerMetrics` if None).
    """

    def __init__(
        self,
        llama: Llama,
        *,
        max_queue: int = 64,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        metrics: ServerMetrics | None = None,
    ):
        if max_queue < 0 or prefill_chunk < 1:
            raise Llama2Error("max_queue must be >= 0 and prefill_chunk >= 1")
        self.llama = llama
        self.model = llama.native or llama.model  # the forward `Llama` generates with: same tokens
        self.tokenizer = llama.tokenizer
        self.max_seq_len = llama.max_seq_len
        self.vocab_size = llama.model.args.vocab_size
        self.num_slots = llama.max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or ServerMetrics(self.num_slots)
        self._device = llama.device
        self._seeds = random.Random()
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # guarded by _cond
        self._in_flight = 0  # sequences waiting or holding a slot, guarded by _cond
        self._closed = True  # guarded by _cond
        self._active: list[_Sequence] = []  # engine thread only
        self._free_slots: list[int] = list(range(self.num_slots))  # engine thread only
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Accept requests; the caller then drives the loop with `run` (e.g. from the main thread)."""
        with self._cond:
            self._closed = False

    def start(self) -> None:
        """Accept requests and run the loop in a worker thread (no-op while already open)."""
        with self._cond:
            if not self._closed:
                return
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="llama2-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Accept requests and run the loop in the calling thread until `stop` (from another thread).

        PyTorch's OpenMP workers answer the main thread's parallel regions fastest (about
        twice as fast as a second thread's on small decode steps), so a server process
        runs the engine here and its HTTP event loop in a thread.
        """
        self.open()
        self._run()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, cancel the remaining ones and join the worker thread, if any."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the engine accepts requests."""
        return not self._closed

    # ------------------------------------------------------------------ requests

    def validate(self, request: GenerationRequest) -> None:
        """Raise `Llama2Error` (or `ContextLengthError`) if `request` cannot run here."""
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise Llama2Error("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise Llama2Error(f"prompt token ids must be in [0, {vocab})")
        if request.max_tokens < 1:
            raise Llama2Error(f"max_tokens must be at least 1, got {request.max_tokens}")
        if prompt_len + request.max_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{prompt_len + request.max_tokens} tokens ({prompt_len} in the prompt, {request.max_tokens} "
                "in the completion). Please reduce the prompt or the completion length."
            )
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= vocab:
            raise Llama2Error(f"top_logprobs must be in [0, {vocab}]")

    def submit(self, requests: Sequence[GenerationRequest], sink: Callable[[Event], None]) -> Ticket:
        """Queue sequences that share one sink; all are admitted or none.

        Args:
            requests: the sequences (e.g. the `n` choices of one API call).
            sink: receives every `Event`, called from the engine thread; it must not block.

        Returns:
            A ticket to cancel the sequences with.

        Raises:
            Llama2Error: a request is invalid (`ContextLengthError` when it does not fit).
            QueueFullError: the queue cannot take them now.
            EngineClosedError: the engine is not running.
        """
        for request in requests:
            self.validate(request)
        ticket = Ticket(sink, len(requests))
        now = time.perf_counter()
        sequences = [self._new_sequence(request, ticket, now) for request in requests]
        with self._cond:
            if self._closed:
                self.metrics.rejected.labels("closed").inc()
                raise EngineClosedError("the server is shutting down; retry on another instance")
            self._drop_cancelled_waiting()  # a client that left frees its queue place at once
            if self._in_flight + len(sequences) > self.num_slots + self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(
                    f"the server is busy: {len(self._waiting)} requests are waiting for one of "
                    f"{self.num_slots} slots (queue limit {self.max_queue}); retry later"
                )
            self._waiting.extend(sequences)
            self._in_flight += len(sequences)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify_all()
        return ticket

    def _drop_cancelled_waiting(self) -> None:
        """Forget waiting sequences whose tickets were cancelled (with the lock held)."""
        kept = deque(seq for seq in self._waiting if not seq.ticket.cancelled)
        dropped = len(self._waiting) - len(kept)
        if dropped:
            self._waiting = kept
            self._in_flight -= dropped
            self.metrics.sequences_finished.labels("cancelled").inc(dropped)
            self.metrics.queue_depth.set(len(kept))

    def _new_sequence(self, request: GenerationRequest, ticket: Ticket, now: float) -> _Sequence:
        seed = self._seeds.getrandbits(63) if request.seed is None else request.seed % _SEED_MODULUS
        generator = torch.Generator(device=self._device).manual_seed(seed)
        streamer = TextStreamer(self.tokenizer, request.stop)
        return _Sequence(request, ticket, streamer, generator, now, tokens=list(request.prompt_ids))

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception as err:  # a failed step must not take the server down
                    logger.exception("engine step failed")
                    self._fail_active(f"generation failed: {type(err).__name__}: {err}")
        self._cancel_everything()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once closed."""
        with self._cond:
            while not self._closed and not self._active and not self._waiting:
                self._cond.wait(0.5)  # a timeout keeps a main thread responsive to signals everywhere
            return not self._closed

    def _step(self) -> None:
        """One token boundary: drop cancelled, admit, prefill a chunk, decode a token for all."""
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.ticket.cancelled]:
            self._release(seq, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            self._drop_cancelled_waiting()
            while self._free_slots and self._waiting:
                seq = self._waiting.popleft()
                seq.slot = self._free_slots.pop(0)
                self._active.append(seq)
            self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._active))

    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` prompt tokens, oldest sequence first.

        A prompt's chunks always start at multiples of `prefill_chunk` (whatever else is
        running), so its cache and first token do not depend on the other requests, and a
        prompt of at most `prefill_chunk` tokens is prefilled in one pass like `Llama`'s.
        """
        budget = self.prefill_chunk
        for seq in [s for s in self._active if not s.decoding]:
            start = seq.prefilled
            end = min(seq.prompt_len, start + self.prefill_chunk)
            if end - start > budget:
                return  # the next step has room for the whole chunk
            tokens = torch.tensor([seq.tokens[start:end]], dtype=torch.long, device=self._device)
            positions = torch.arange(start, end, device=self._device)
            slots = torch.tensor([seq.slot], device=self._device)
            logits = self.model(tokens, positions, cache_slots=slots, kv_len=end, last_logits_only=True)
            seq.prefilled, budget = end, budget - (end - start)
            self.metrics.prompt_tokens.inc(end - start)
            if seq.decoding:
                self._accept(seq, logits[0, -1])

    def _decode(self) -> None:
        """The last token of every decoding sequence, in batched forward passes."""
        rows = [s for s in self._active if s.decoding]
        for first in range(0, len(rows), DECODE_ROWS_PER_PASS):
            self._decode_rows(rows[first : first + DECODE_ROWS_PER_PASS])
        if rows:
            self.metrics.window.add(len(rows))

    def _decode_rows(self, rows: list[_Sequence]) -> None:
        tokens = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=self._device)  # [B, 1]
        positions = torch.tensor([[len(s.tokens) - 1] for s in rows], device=self._device)  # [B, 1]
        slots = torch.tensor([s.slot for s in rows], device=self._device)  # [B]
        kv_lens = [len(s.tokens) for s in rows]  # per-row attention: each row as if decoded alone
        logits = self.model(tokens, positions, cache_slots=slots, kv_len=kv_lens)[:, -1]  # [B, vocab]
        for seq, row_logits in zip(rows, logits):
            self._accept(seq, row_logits)

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits ([vocab]) and report it."""
        request = seq.request
        context = None
        if request.sampling.repetition_penalty != 1.0:
            context = torch.tensor([seq.tokens], dtype=torch.long, device=logits.device)
        token = int(sample_next(logits[None], request.sampling, seq.generator, context)[0])
        if seq.generated == 0:
            self.metrics.time_to_first_token.observe(time.perf_counter() - seq.submitted_at)
        if token in request.stop_ids:
            self._finish(seq, "stop", seq.streamer.flush(), ())
            return
        logprobs = ()
        if request.top_logprobs is not None:
            previous = seq.tokens[-1] if seq.generated else None
            logprobs = (self._logprob(logits, token, request.top_logprobs, previous),)
        seq.tokens.append(token)
        seq.generated += 1
        self.metrics.generation_tokens.inc()
        text = seq.streamer.push(token)
        if seq.streamer.stopped:
            self._finish(seq, "stop", text + seq.streamer.flush(), logprobs)
        elif seq.generated >= request.max_tokens or len(seq.tokens) >= self.max_seq_len:
            self._finish(seq, "length", text + seq.streamer.flush(), logprobs)
        else:
            self._emit(seq, Event(request.index, text, logprobs, completion_tokens=seq.generated))

    def _logprob(self, logits: torch.Tensor, token: int, top: int, previous: int | None) -> TokenLogprob:
        """The token's log-probability and the `top` most likely ones, as text after `previous`."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        alternatives = ()
        if top > 0:
            values, ids = torch.topk(logprobs, top)
            alternatives = tuple((int(i), self._piece(previous, int(i)), float(v)) for v, i in zip(values, ids))
        return TokenLogprob(token, self._piece(previous, token), float(logprobs[token]), alternatives)

    def _piece(self, previous: int | None, token: int) -> str:
        """The text `token` adds after `previous` (so SentencePiece keeps its leading space mid-text)."""
        if previous is None:
            return self.tokenizer.decode([token])
        before = self.tokenizer.decode([previous])
        after = self.tokenizer.decode([previous, token])
        return after[len(before) :] if after.startswith(before) else self.tokenizer.decode([token])

    def _finish(self, seq: _Sequence, reason: str, text: str, logprobs: tuple[TokenLogprob, ...]) -> None:
        self._emit(seq, Event(seq.request.index, text, logprobs, reason, completion_tokens=seq.generated))
        self._release(seq, reason)

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.ticket.sink(event)
        except Exception:  # the listener is gone (e.g. its event loop closed)
            logger.debug("dropping a sequence whose listener is gone", exc_info=True)
            seq.ticket.cancel()

    def _release(self, seq: _Sequence, reason: str) -> None:
        """Give the sequence's slot back."""
        self._active.remove(seq)
        with self._cond:
            self._free_slots.append(seq.slot)
            self._free_slots.sort()
            self._in_flight -= 1
        seq.slot = -1
        self.metrics.sequences_finished.labels(reason).inc()
        self.metrics.sequence_latency.observe(time.perf_counter() - seq.submitted_at)
        self.metrics.running.set(len(self._active))

    def _fail_active(self, message: str) -> None:
        for seq in list(self._active):
            self._emit(seq, Event(seq.request.index, finish_reason="error", error=message))
            self._release(seq, "error")

    def _cancel_everything(self) -> None:
        """At shutdown: tell every remaining listener, free every slot."""
        message = "the server shut down before this request finished"
        self._fail_active(message)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            self._in_flight -= len(waiting)
            self.metrics.queue_depth.set(0)
        for seq in waiting:
            self._emit(seq, Event(seq.request.index, finish_reason="error", error=message))
