"""OpenAI's wire format: request models, the error shape and response pieces.

Request models are strict (no type coercion: `"max_tokens": "12"` is an error, as at
OpenAI) and refuse unknown fields, so a typo is a 400 naming the field instead of a
silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine import TokenLogprob

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "chat_logprobs",
    "completion_logprobs",
    "error_body",
]

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1


class APIError(Exception):
    """An error answered in OpenAI's shape.

    Args:
        status: HTTP status code.
        message: what went wrong and how to fix it.
        type: OpenAI's error type (invalid_request_error, authentication_error, ...).
        param: the request field at fault, if any.
        code: a machine-readable code (model_not_found, context_length_exceeded, ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


StopStrings = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
Seed = Annotated[int, Field(ge=_SEED_MIN, le=_SEED_MAX)]


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationFields(_Strict):
    """Fields shared by completions and chat completions (OpenAI's, plus top_k and repetition_penalty)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1)] = 0  # vLLM's extension; -1 or 0 keep every token
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_GenerationFields):
    """`POST /v1/completions`."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def dialog(self) -> list[dict[str, str]]:
        """The messages as a `Dialog` (OpenAI's "developer" role is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    return {
        "content": [
            {**_token_entry(e.text, e.logprob), "top_logprobs": [_token_entry(t, lp) for _, t, lp in e.top]}
            for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """Completions' `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets = list(_offsets(entries, text_offset))
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _offsets(entries: Iterable[TokenLogprob], start: int) -> Iterable[int]:
    for e in entries:
        yield start
        start += len(e.text)
