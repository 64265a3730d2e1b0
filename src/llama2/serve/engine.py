"""Continuous batching: one worker thread owns the model and advances every request.

Requests wait in a bounded queue until one of the `max_batch_size` KV-cache slots is
free. Each engine step (a token boundary) drops cancelled sequences, admits waiting
ones, and runs one `llama2.decode.DecodeBatch` step over the sequences holding slots:
at most `prefill_chunk` prompt tokens (so a long prompt delays the running sequences by
one chunk per step, not by its whole length), then one token for every sequence whose
prompt is in the cache, in batched forward passes with per-row positions, cache slots
and cache lengths. The request lifecycle (validation, sampling with the sequence's own
seeded generator, stop tokens, stop strings, incremental text) is `llama2.decode`'s, the
same `Llama.stream_tokens` runs, so greedy answers equal `Llama.chat_completion`'s.
Text pieces go to the request's `sink` (thread-safe, e.g. `loop.call_soon_threadsafe`
onto an asyncio queue).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..decode import (
    PREFILL_CHUNK,
    ContextLengthError,
    DecodeBatch,
    DecodingSequence,
    GenerationRequest,
    Output,
    TokenLogprob,
    check_request,
)
from ..errors import Llama2Error
from ..generation import Llama
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
_SEED_MODULUS = 1 << 64


class QueueFullError(Llama2Error):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class EngineClosedError(Llama2Error):
    """The engine is not running or shutting down (HTTP 503)."""


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


class _Sequence(DecodingSequence):
    """Engine-thread state of one sequence: its lifecycle, its ticket and when it was submitted."""

    def __init__(self, request: GenerationRequest, ticket: Ticket, submitted_at: float, **lifecycle):
        super().__init__(request, **lifecycle)
        self.ticket = ticket
        self.submitted_at = submitted_at


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
        if max_queue < 0:
            raise Llama2Error("max_queue must be >= 0")
        self.llama = llama
        self.batch = DecodeBatch(llama.steps, prefill_chunk)  # the forwards `Llama` generates with: same tokens
        self.tokenizer = llama.tokenizer
        self.max_seq_len = llama.max_seq_len
        self.vocab_size = llama.model.args.vocab_size
        self.num_slots = llama.max_batch_size
        self.max_queue = max_queue
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

        PyTorch's OpenMP workers answer the main thread's parallel regions faster than a
        second thread's on small decode steps (docs/performance.md), so a server process
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
        check_request(request, self.vocab_size, self.max_seq_len)

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
        return _Sequence(
            request, ticket, now, tokenizer=self.tokenizer, generator=generator, max_seq_len=self.max_seq_len
        )

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
        counts = self.batch.step(list(self._active), self._report)
        self.metrics.prompt_tokens.inc(counts.prompt_tokens)
        if counts.decoded_rows:
            self.metrics.window.add(counts.decoded_rows)

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

    def _report(self, seq: _Sequence, output: Output) -> None:
        """Count and send what a sampled token did; free the slot of a finished sequence."""
        if seq.accepted == 1:
            self.metrics.time_to_first_token.observe(time.perf_counter() - seq.submitted_at)
        if output.token is not None:
            self.metrics.generation_tokens.inc()
        event = Event(
            seq.request.index, output.text, output.logprobs, output.finish_reason, completion_tokens=seq.generated
        )
        self._emit(seq, event)
        if output.finish_reason is not None:
            self._release(seq, output.finish_reason)

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
