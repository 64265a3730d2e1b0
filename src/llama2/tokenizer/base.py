"""The `Tokenizer` interface (Meta's Llama 2 API), whatever the backend, and how one is loaded.

Plain `encode` never reads special tokens written in the text (`"<s>"` is three plain
pieces, as in Meta's code); `encode_with_special` does, for rendered chat templates.
Backends (`SentencePieceTokenizer`, `HFTokenizer`) register themselves, by the file they
are saved as and the GGUF `tokenizer.ggml.model` they rebuild, for `Tokenizer.from_file`
and `Tokenizer.from_gguf_metadata`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from gguf.constants import Keys

from ..errors import Llama2Error
from ..weights.gguf_header import MAGIC, read_gguf_metadata
from ..weights.tokenizer_files import (
    HF_FILE,
    SENTENCEPIECE_FILE,
    TOKENIZER_FILES,
    find_tokenizer_file,
    read_tokenizer_config,
)

__all__ = ["END_OF_TURN_PIECES", "Tokenizer", "special_pattern", "split_specials"]

#: Special tokens that end a turn in common chat vocabularies; those a vocabulary marks
#: as special join its `stop_ids`, next to EOS.
END_OF_TURN_PIECES = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
)

# Backends by `file_name` and by `gguf_model`, filled as they are defined.
_BY_FILE_NAME: dict[str, type[Tokenizer]] = {}
_BY_GGUF_MODEL: dict[str, type[Tokenizer]] = {}


class Tokenizer(ABC):
    """Meta's tokenizer interface, whatever the backend.

    Attributes:
        bos_id: Beginning-of-sequence id, -1 when the vocabulary has none.
        eos_id: End-of-sequence id, -1 when the vocabulary has none.
        pad_id: Padding id, -1 when the vocabulary has none.
        n_words: Vocabulary size (ids are 0..n_words-1).
        stop_ids: Ids that end generation: EOS plus the end-of-turn tokens
            (`END_OF_TURN_PIECES`, GGUF `eot`/`eom` ids) the vocabulary has as special.
        bos_token: BOS's text (for chat templates), None without BOS.
        eos_token: EOS's text, None without EOS.
        add_bos: Whether this model's prompts start with BOS by default.
        chat_template: The checkpoint's Jinja chat template, if it ships one.
    """

    def __init__(
        self,
        *,
        n_words: int,
        bos_id: int,
        eos_id: int,
        pad_id: int = -1,
        add_bos: bool = True,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.n_words = n_words
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token = self._piece_or_none(bos_id)
        self.eos_token = self._piece_or_none(eos_id)
        self.stop_ids = self._find_stop_ids(extra_stop_ids)

    # -- the public API ------------------------------------------------------------

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Encodes text as plain text: special tokens written in it are not parsed.

        Args:
            s: The text.
            bos: Prepend BOS (skipped when the vocabulary has none).
            eos: Append EOS (skipped when the vocabulary has none).

        Returns:
            The token ids.
        """
        ids = self._encode_plain(s)
        if bos and self.bos_id >= 0:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    @abstractmethod
    def encode_with_special(self, s: str) -> list[int]:
        """Encodes text, reading special tokens written in it (`"<|im_start|>"`) as ids.

        No BOS is added. Used for the text a chat template renders.

        Args:
            s: The text.

        Returns:
            The token ids.
        """

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text, dropping BOS, EOS and other control tokens.

        Args:
            ids: Token ids, each in 0..n_words-1.

        Returns:
            The text.

        Raises:
            Llama2Error: An id is outside the vocabulary.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id `i`, as the backend spells it (`"▁the"`, `"Ġthe"`).

        Raises:
            Llama2Error: `i` is outside the vocabulary.
        """
        self._check_id(i)
        return self._id_to_piece(int(i))

    @abstractmethod
    def piece_to_id(self, s: str) -> int | None:
        """The id of vocabulary entry `s`, or None when there is no such entry."""

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """The vocabulary's special (control) tokens, text to id."""

    # -- constructors --------------------------------------------------------------

    @staticmethod
    def from_file(path: str | Path) -> Tokenizer:
        """Loads a tokenizer from a file or a checkpoint folder.

        Args:
            path: A SentencePiece `.model` file, a `.gguf` file, a Hugging Face
                `tokenizer.json`, or a folder holding `tokenizer.model` or
                `tokenizer.json` (with optional `tokenizer_config.json` and
                `chat_template.jinja`; a file's siblings are read the same way).

        Returns:
            The tokenizer.

        Raises:
            Llama2Error: The path is missing, unreadable, or holds no tokenizer.
        """
        path = Path(path)
        if path.is_dir():
            return _from_folder(path)
        if not path.is_file():
            raise Llama2Error(f"{path}: no such tokenizer file or folder")
        head = _read_head(path)
        if head == MAGIC:
            meta = {k: v for k, v in read_gguf_metadata(path).items() if k.startswith("tokenizer.")}
            return Tokenizer.from_gguf_metadata(meta, source=str(path))
        name = HF_FILE if path.suffix == ".json" or head.lstrip()[:1] == b"{" else SENTENCEPIECE_FILE
        return _BY_FILE_NAME[name].load(path, read_tokenizer_config(path.parent))

    @staticmethod
    def from_gguf_metadata(meta: Mapping[str, Any], *, source: str = "GGUF metadata") -> Tokenizer:
        """Builds the tokenizer a GGUF file's metadata describes.

        Args:
            meta: GGUF keys to plain values (lists for arrays), as `llama2.weights.gguf` reads them
                (`meta["tokenizer.ggml.tokens"]` is a list of str).
            source: What the metadata came from (a file name), for error messages.

        Returns:
            A `SentencePieceTokenizer` for `tokenizer.ggml.model == "llama"`, an
            `HFTokenizer` for `"gpt2"` (byte-level BPE).

        Raises:
            Llama2Error: The metadata lacks a vocabulary, or names a tokenizer model or
                pre-tokenizer this library does not know.
        """
        kind = meta.get(Keys.Tokenizer.MODEL)
        backend = _BY_GGUF_MODEL.get(kind)
        if backend is None:
            raise Llama2Error(
                f"{source}: unsupported tokenizer model {kind!r} (supported: {', '.join(sorted(_BY_GGUF_MODEL))})"
            )
        if not meta.get(Keys.Tokenizer.LIST):
            raise Llama2Error(f"{source}: no {Keys.Tokenizer.LIST} vocabulary")
        return backend.from_gguf(meta, source)

    # -- what each backend provides ------------------------------------------------

    #: The file a checkpoint folder keeps this backend's vocabulary in.
    file_name: ClassVar[str]
    #: The `tokenizer.ggml.model` of the GGUF vocabularies this backend rebuilds.
    gguf_model: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Registers a backend that declares `file_name` and `gguf_model`, for the constructors above."""
        super().__init_subclass__(**kwargs)
        if "file_name" in cls.__dict__:
            _BY_FILE_NAME[cls.file_name] = cls
        if "gguf_model" in cls.__dict__:
            _BY_GGUF_MODEL[cls.gguf_model] = cls

    @classmethod
    @abstractmethod
    def load(cls, path: Path, config: Mapping[str, Any]) -> Tokenizer:
        """Loads a vocabulary file of this backend's kind.

        Args:
            path: The file (`file_name`, or any name).
            config: Its folder's `tokenizer_config.json` (see `read_tokenizer_config`).

        Raises:
            Llama2Error: The file is not such a vocabulary.
        """

    @classmethod
    @abstractmethod
    def from_gguf(cls, meta: Mapping[str, Any], source: str) -> Tokenizer:
        """Rebuilds a GGUF vocabulary whose `tokenizer.ggml.model` is `gguf_model`."""

    @abstractmethod
    def vocabulary_file(self) -> bytes:
        """The bytes of this vocabulary as the file `file_name` (what `load` reads back)."""

    @abstractmethod
    def gguf_vocabulary(self) -> dict[str, Any]:
        """The `tokenizer.ggml.*` keys describing the vocabulary (model, tokens, types, ...).

        Special ids, BOS/EOS flags and the chat template are not among them.

        Raises:
            Llama2Error: The vocabulary has no GGUF form.
        """

    def special_token_map(self) -> dict[str, str]:
        """The special tokens' text as `special_tokens_map.json` names them (`"bos_token"`, ...)."""
        pieces = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {key: self._id_to_piece(i) for key, i in pieces.items() if 0 <= i < self.n_words}

    # -- for subclasses ------------------------------------------------------------

    @abstractmethod
    def _encode_plain(self, s: str) -> list[int]:
        """Encodes text without parsing special tokens and without BOS/EOS."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decodes ids already checked to be in range."""

    @abstractmethod
    def _id_to_piece(self, i: int) -> str:
        """The piece of an id already checked to be in range."""

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.n_words:
            raise Llama2Error(f"token id {i} is outside the vocabulary (0..{self.n_words - 1})")

    def _piece_or_none(self, i: int) -> str | None:
        return self._id_to_piece(i) if 0 <= i < self.n_words else None

    def _find_stop_ids(self, extra: Iterable[int]) -> frozenset[int]:
        specials = self.special_tokens()
        stops = {specials[p] for p in END_OF_TURN_PIECES if p in specials}
        stops.update(i for i in (self.eos_id, *extra) if 0 <= i < self.n_words)
        return frozenset(stops)


# -- files and folders -----------------------------------------------------------------


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC))
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from e


def _from_folder(folder: Path) -> Tokenizer:
    path = find_tokenizer_file(folder)
    if path is None:
        raise Llama2Error(f"{folder}: no {' or '.join(TOKENIZER_FILES)} in this folder")
    return _BY_FILE_NAME[path.name].load(path, read_tokenizer_config(folder))


# -- special-token splitting -----------------------------------------------------------


def special_pattern(pieces: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `pieces`, longest first; None when there are none."""
    ordered = sorted(pieces, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(p) for p in ordered) + ")")


def split_specials(s: str, pattern: re.Pattern[str] | None) -> Iterator[str]:
    """Splits `s` into special tokens (matches of `pattern`) and the non-empty text between them."""
    parts = [s] if pattern is None else pattern.split(s)
    return (p for p in parts if p)
