"""Chat formats: turning a dialog into the exact prompt ids a model expects.

`Llama2ChatFormat` is Meta's Llama-2-Chat prompt, token for token (llama/generation.py
`chat_completion`). `JinjaChatFormat` renders a checkpoint's own Jinja chat template
(from GGUF metadata or tokenizer_config.json) in a sandbox. `resolve_chat_format` picks
one for a model.
"""

from __future__ import annotations

import datetime
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypedDict

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama2.errors import Llama2Error
from llama2.tokenizer import SentencePieceTokenizer, Tokenizer

__all__ = [
    "B_INST",
    "B_SYS",
    "CHATML_TEMPLATE",
    "CHAT_FORMAT_NAMES",
    "E_INST",
    "E_SYS",
    "SPECIAL_TAGS",
    "UNSAFE_REQUEST_ERROR",
    "ChatFormat",
    "Dialog",
    "JinjaChatFormat",
    "Llama2ChatFormat",
    "Message",
    "RawFormat",
    "chatml_format",
    "contains_special_tags",
    "resolve_chat_format",
]

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    """One chat message, as in Meta's llama/generation.py."""

    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_REQUEST_ERROR = "Error: special tags are not allowed as part of the prompt."

#: ChatML, for vocabularies with `<|im_start|>` but no template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def contains_special_tags(dialog: Dialog) -> bool:
    """Whether any message contains a Llama-2-Chat tag (Meta answers `UNSAFE_REQUEST_ERROR`).

    Args:
        dialog: The messages.

    Returns:
        True when some message content contains one of `SPECIAL_TAGS`.
    """
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


class ChatFormat(ABC):
    """Turns a dialog into prompt ids for one model.

    Attributes:
        name: The format's name (`"llama-2"`, `"chatml"`, `"jinja"`, `"raw"`).
        tokenizer: The tokenizer the ids belong to.
    """

    name: str = "chat"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end the assistant's answer."""
        return self.tokenizer.stop_ids

    @abstractmethod
    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """The exact prompt ids, ending where the assistant's answer starts.

        Args:
            dialog: The messages so far, the last one from the user.

        Returns:
            The prompt ids.

        Raises:
            Llama2Error: The dialog does not fit the format.
        """


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama-2-Chat prompt, exactly as llama/generation.py builds it.

    A system message is folded into the first user message between `<<SYS>>` tags; each
    finished (user, assistant) exchange is `<s>[INST] user [/INST] answer </s>`, and the
    prompt ends with `<s>[INST] last user message [/INST]`. Tags inside messages are
    encoded as plain text; use `contains_special_tags` to reproduce Meta's refusal.
    """

    name = "llama-2"

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        turns = _fold_system_message(_check_nonempty(dialog))
        _check_alternation(turns)
        ids: list[int] = []
        for prompt, answer in zip(turns[::2], turns[1::2], strict=False):
            text = f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} "
            ids += self.tokenizer.encode(text, bos=True, eos=True)
        last = f"{B_INST} {(turns[-1]['content']).strip()} {E_INST}"
        return ids + self.tokenizer.encode(last, bos=True, eos=False)


def _check_nonempty(dialog: Dialog) -> Dialog:
    if not dialog:
        raise Llama2Error("the dialog is empty: it needs at least one user message")
    return dialog


def _fold_system_message(dialog: Dialog) -> list[Message]:
    """Meta's folding of a leading system message into the first user message."""
    if dialog[0]["role"] != "system":
        return list(dialog)
    if len(dialog) < 2:
        raise Llama2Error("the dialog has a system message but no user message after it")
    first: Message = {
        "role": dialog[1]["role"],
        "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
    }
    return [first, *dialog[2:]]


def _check_alternation(turns: list[Message]) -> None:
    """Meta's rule: user/assistant alternating, starting and ending with user."""
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise Llama2Error(
                f"message {i} has role {msg['role']!r} where {expected!r} was expected: "
                "Llama-2-Chat takes an optional 'system' message, then 'user' and "
                "'assistant' alternating (u/a/u/a/u...)"
            )
    if turns[-1]["role"] != "user":
        raise Llama2Error(f"the last message must be from the user, got {turns[-1]['role']!r}")


class JinjaChatFormat(ChatFormat):
    """A Jinja chat template (Hugging Face style), rendered in a sandbox and tokenized.

    The template sees `messages`, `bos_token`, `eos_token`, `add_generation_prompt`,
    `raise_exception(msg)` and `strftime_now(fmt)`. Special tokens in the rendered text
    are read as ids; BOS is prepended when the tokenizer wants one and the text did
    not already start with it.

    Args:
        template: The Jinja source.
        tokenizer: The model's tokenizer.
        add_generation_prompt: Render the opening of the assistant's turn.
        name: The format's name.

    Raises:
        Llama2Error: The template does not compile.
    """

    def __init__(
        self,
        template: str,
        tokenizer: Tokenizer,
        add_generation_prompt: bool = True,
        name: str = "jinja",
    ) -> None:
        super().__init__(tokenizer)
        self.name = name
        self.add_generation_prompt = add_generation_prompt
        try:
            self._template = _jinja_environment().from_string(template)
        except jinja2.TemplateError as e:
            raise Llama2Error(f"chat template does not compile: {e}") from e

    def render(self, dialog: Dialog) -> str:
        """The template's text for `dialog`.

        Raises:
            Llama2Error: The template fails, calls `raise_exception`, or breaks the sandbox.
        """
        try:
            return self._template.render(
                messages=[dict(m) for m in dialog],
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
                add_generation_prompt=self.add_generation_prompt,
            )
        except Llama2Error:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise Llama2Error(f"chat template refused by the sandbox: {e}") from e
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as e:
            raise Llama2Error(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        ids = self.tokenizer.encode_with_special(self.render(_check_nonempty(dialog)))
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos >= 0 and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids


def _raise_exception(message: str) -> NoReturn:
    raise Llama2Error(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, **kwargs: Any) -> str:
    """Hugging Face's `tojson`: plain JSON, no HTML escaping."""
    return json.dumps(value, ensure_ascii=False, indent=indent, **kwargs)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox configured like transformers' chat template rendering."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class RawFormat(ChatFormat):
    """No chat template: the message contents joined by blank lines (completion models)."""

    name = "raw"

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        text = "\n\n".join(m["content"] for m in _check_nonempty(dialog))
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos, eos=False)


def chatml_format(tokenizer: Tokenizer) -> JinjaChatFormat:
    """ChatML (`<|im_start|>role\\n...<|im_end|>`) as a `JinjaChatFormat` named "chatml"."""
    return JinjaChatFormat(CHATML_TEMPLATE, tokenizer, name="chatml")


_NAMED_FORMATS: Mapping[str, Callable[[Tokenizer], ChatFormat]] = MappingProxyType(
    {
        "llama-2": Llama2ChatFormat,
        "llama2": Llama2ChatFormat,
        "chatml": chatml_format,
        "raw": RawFormat,
    }
)

#: Names `resolve_chat_format(override=...)` accepts, besides a template or .jinja path.
CHAT_FORMAT_NAMES = tuple(_NAMED_FORMATS)


def resolve_chat_format(tokenizer: Tokenizer, chat_template: str | None, override: str | None = None) -> ChatFormat:
    """Picks the chat format for a model.

    Order: `override`, else the checkpoint's own template, else Llama-2-Chat for Llama 2's
    SentencePiece vocabulary, else ChatML when the vocabulary has `<|im_start|>`.

    Args:
        tokenizer: The model's tokenizer.
        chat_template: The checkpoint's Jinja template, if it has one.
        override: A name from `CHAT_FORMAT_NAMES`, a path to a `.jinja` file, or a
            Jinja template itself.

    Returns:
        The chat format.

    Raises:
        Llama2Error: `override` is not understood, or nothing fits the model.
    """
    if override is not None:
        return _format_from_override(tokenizer, override)
    if chat_template:
        return JinjaChatFormat(chat_template, tokenizer)
    if _is_llama2_vocabulary(tokenizer):
        return Llama2ChatFormat(tokenizer)
    if tokenizer.piece_to_id("<|im_start|>") is not None:
        return chatml_format(tokenizer)
    raise Llama2Error(
        "no chat format for this model: it has no chat template and its vocabulary is "
        f"neither Llama 2's nor ChatML's; pass --chat-format ({', '.join(CHAT_FORMAT_NAMES)}, "
        "a .jinja file or a template)"
    )


def _format_from_override(tokenizer: Tokenizer, override: str) -> ChatFormat:
    factory = _NAMED_FORMATS.get(override.strip().lower())
    if factory is not None:
        return factory(tokenizer)
    if override.endswith(".jinja"):
        path = Path(override)
        try:
            return JinjaChatFormat(path.read_text(encoding="utf-8"), tokenizer)
        except (OSError, UnicodeDecodeError) as e:
            raise Llama2Error(f"{path}: cannot read the chat template ({e})") from e
    if "{{" in override or "{%" in override:
        return JinjaChatFormat(override, tokenizer)
    raise Llama2Error(
        f"unknown chat format {override!r}: use one of {', '.join(CHAT_FORMAT_NAMES)}, "
        "a .jinja file or a Jinja template"
    )


def _is_llama2_vocabulary(tokenizer: Tokenizer) -> bool:
    """Llama 2's SentencePiece vocabulary: BOS `<s>`, and `[INST]` is not a special token."""
    return (
        isinstance(tokenizer, SentencePieceTokenizer)
        and tokenizer.bos_token == "<s>"
        and tokenizer.eos_token == "</s>"
        and "[INST]" not in tokenizer.special_tokens()
    )
