"""The OpenAI-compatible HTTP API over an `Engine`, as a FastAPI app.

`create_app(engine, model_name, api_key)` builds the app; everything it needs lives in
the `ServerState` stored on `app.state` (no module-level state). Routes:

- `GET /` the chat page; `GET /health`; `GET /metrics` (Prometheus text);
- `GET /v1/models`, `GET /v1/models/{id}`;
- `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true`).

Every error is JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..chat import ChatFormat, Llama2ChatFormat, contains_special_tags
from ..errors import Llama2Error
from ..sampling import SamplingParams
from .engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    Event,
    GenerationRequest,
    QueueFullError,
    Ticket,
    TokenLogprob,
)
from .guard import Guard, install_error_handlers
from .metrics import CONTENT_TYPE_LATEST
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs, error_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "create_app"]

DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerState:
    """What the routes share: the engine, the served model's name and the API key."""

    engine: Engine
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat_format(self) -> ChatFormat:
        fmt = self.engine.llama.chat_format
        if fmt is None:
            raise APIError(400, "this model has no chat format; use /v1/completions", param="messages")
        return fmt

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`.

    The app starts the engine when it starts and stops it when it shuts down.

    Args:
        engine: the batching engine (not yet started).
        model_name: the name clients pass as `model` and `/v1/models` lists.
        api_key: when set, `/v1/*` and `/metrics` need `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies get a 413.
    """
    app = FastAPI(title="llama2", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, model_name, api_key or None)
    app.add_middleware(Guard, api_key=api_key or None, metrics=engine.metrics, max_body_bytes=max_body_bytes)
    install_error_handlers(app)
    app.include_router(_pages)
    app.include_router(_v1)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: Engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(engine.stop)


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _engine_error(error: Llama2Error) -> APIError:
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), "rate_limit_exceeded", code="queue_full")
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), "server_error", code="unavailable")
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), code="context_length_exceeded")
    return APIError(400, str(error))


# ---------------------------------------------------------------------------- plain routes

_pages = APIRouter()
_v1 = APIRouter(prefix="/v1")


@_pages.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8"))


@_pages.get("/health")
async def health(request: Request) -> JSONResponse:
    engine = _state(request).engine
    ok = engine.running
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


@_pages.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "llama2",
        "max_model_len": state.engine.max_seq_len,
    }


@_v1.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


@_v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(model_id)
    return _model_card(state)


# ---------------------------------------------------------------------------- generation routes


@_v1.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    _check_supported(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must be equal to n (or left out)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported", param="echo")
    tokenizer = state.engine.tokenizer
    prompts = _prompt_ids(body.prompt, tokenizer)
    echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts]
    call = _Call(COMPLETION, state.model_name, body.n * len(prompts), body.logprobs is not None)
    call.prefixes = [echo for echo in echoes for _ in range(body.n)]
    sequences = _sequences(state, body, prompts, body.max_tokens, tokenizer.stop_ids, body.logprobs)
    return await _respond(request, state, call, sequences, body, sum(len(p) for p in prompts))


@_v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    _check_supported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    fmt = state.chat_format
    dialog = body.dialog()
    if isinstance(fmt, Llama2ChatFormat) and contains_special_tags(dialog):
        raise APIError(400, "messages must not contain Llama-2-Chat tags ([INST], <<SYS>>, ...)", param="messages")
    try:
        prompt = fmt.encode_dialog_prompt(dialog)
    except Llama2Error as err:
        raise APIError(400, str(err), param="messages") from None
    top = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    call = _Call(CHAT, state.model_name, body.n, body.logprobs)
    sequences = _sequences(state, body, [prompt], max_tokens, fmt.stop_ids, top)
    return await _respond(request, state, call, sequences, body, len(prompt))


def _check_supported(body: CompletionRequest | ChatCompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _prompt_ids(prompt: str | list, tokenizer) -> list[list[int]]:
    """The completion prompt(s) as token ids: a string, strings, ids or lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt[0], int):
        prompt = [prompt]
    return [tokenizer.encode(p, bos=tokenizer.add_bos, eos=False) if isinstance(p, str) else list(p) for p in prompt]


def _sequences(
    state: ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    stop_ids: frozenset[int],
    top_logprobs: int | None,
) -> list[GenerationRequest]:
    """One `GenerationRequest` per prompt and choice; choice j of a seeded call uses seed + j."""
    engine = state.engine
    if len(prompts) * body.n > engine.num_slots:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceed the {engine.num_slots} batch slots", param="n")
    try:
        sampling = SamplingParams(body.temperature, body.top_p, max(body.top_k, 0), body.repetition_penalty)
    except Llama2Error as err:
        raise APIError(400, str(err)) from None
    sequences = []
    for i, prompt in enumerate(prompts):
        for j in range(body.n):
            sequences.append(
                GenerationRequest(
                    prompt,
                    max_tokens or max(engine.max_seq_len - len(prompt), 1),
                    sampling,
                    None if body.seed is None else body.seed + j,
                    stop_ids,
                    body.stop_strings(),
                    top_logprobs,
                    index=i * body.n + j,
                )
            )
    return sequences


# ---------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class _Shape:
    """How one endpoint spells its objects and choices."""

    object: str
    chunk_object: str
    id_prefix: str
    chat: bool

    def choice(self, index: int, text: str, entries, finish_reason, want_logprobs: bool, offset: int, chunk: bool):
        logprobs = None
        if want_logprobs:
            logprobs = chat_logprobs(entries) if self.chat else completion_logprobs(entries, offset)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if chunk:
            return {
                "index": index,
                "delta": {"content": text} if text else {},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


CHAT = _Shape("chat.completion", "chat.completion.chunk", "chatcmpl-", True)
COMPLETION = _Shape("text_completion", "text_completion", "cmpl-", False)


@dataclass
class _Choice:
    """A choice's text, tokens and end, accumulated from its events."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs.extend(event.logprobs)
        self.finish_reason = event.finish_reason
        self.tokens = event.completion_tokens


@dataclass
class _Call:
    """One API call's response state."""

    shape: _Shape
    model: str
    n: int
    want_logprobs: bool
    prefixes: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, chunk: bool) -> dict[str, Any]:
        obj = self.shape.chunk_object if chunk else self.shape.object
        return {"id": self.shape.id_prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def prefix(self, index: int) -> str:
        return self.prefixes[index] if self.prefixes else ""


def _usage(prompt_tokens: int, choices: Sequence[_Choice]) -> dict[str, int]:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


async def _respond(
    request: Request,
    state: ServerState,
    call: _Call,
    sequences: list[GenerationRequest],
    body: CompletionRequest | ChatCompletionRequest,
    prompt_tokens: int,
) -> Response:
    """Submit the sequences; answer with one JSON object or a server-sent event stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    try:
        ticket = state.engine.submit(sequences, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    except Llama2Error as err:
        raise _engine_error(err) from None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _stream_chunks(call, ticket, queue, prompt_tokens if usage else None)
        return _EventStream(_sse(chunks), ticket)
    return await _complete(request, state, call, ticket, queue, prompt_tokens)


async def _events(ticket: Ticket, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    """The ticket's events until each of its sequences has finished."""
    remaining = ticket.size
    while remaining:
        event = await queue.get()
        remaining -= event.finish_reason is not None
        yield event


async def _complete(
    request: Request, state: ServerState, call: _Call, ticket: Ticket, queue: asyncio.Queue[Event], prompt_tokens: int
) -> Response:
    """The whole answer as one JSON object; a client that leaves cancels generation at once."""
    choices = [_Choice() for _ in range(call.n)]

    async def gather() -> None:
        async for event in _events(ticket, queue):
            if event.finish_reason == "error":
                raise APIError(
                    503 if not state.engine.running else 500, event.error or "generation failed", "server_error"
                )
            choices[event.index].add(event)

    gathering, leaving = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not gathering.done():
            return Response(status_code=499)  # nobody is listening any more
        gathering.result()
    finally:
        ticket.cancel()
        gathering.cancel()
        leaving.cancel()
    body = call.head(chunk=False)
    body["choices"] = [
        call.shape.choice(i, call.prefix(i) + c.text, c.logprobs, c.finish_reason, call.want_logprobs, 0, chunk=False)
        for i, c in enumerate(choices)
    ]
    body["usage"] = _usage(prompt_tokens, choices)
    return JSONResponse(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream_chunks(
    call: _Call, ticket: Ticket, queue: asyncio.Queue[Event], usage_prompt_tokens: int | None
) -> AsyncIterator[dict[str, Any]]:
    """The stream's chunk objects: an opening chunk per choice, text pieces, then usage if asked."""
    head = call.head(chunk=True)
    choices = [_Choice() for _ in range(call.n)]
    for i in range(call.n):
        opening = {"role": "assistant", "content": ""} if call.shape.chat else None
        if opening or call.prefix(i):
            first = call.shape.choice(i, call.prefix(i), (), None, False, 0, chunk=True)
            if opening:
                first["delta"] = opening
            yield {**head, "choices": [first]}
    async for event in _events(ticket, queue):
        if event.finish_reason == "error":
            yield error_body(event.error or "generation failed", "server_error")
            return
        choice = choices[event.index]
        offset = len(call.prefix(event.index)) + len(choice.text)
        choice.add(event)
        if event.text or event.logprobs or event.finish_reason:
            piece = call.shape.choice(
                event.index, event.text, event.logprobs, event.finish_reason, call.want_logprobs, offset, chunk=True
            )
            yield {**head, "choices": [piece]}
    if usage_prompt_tokens is not None:
        yield {**head, "choices": [], "usage": _usage(usage_prompt_tokens, choices)}


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`."""
    async for chunk in chunks:
        yield b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that cancels its ticket however it ends (done, client gone, shutdown)."""

    def __init__(self, content: AsyncIterator[bytes], ticket: Ticket):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.cancel()
