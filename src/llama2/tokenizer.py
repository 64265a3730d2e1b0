"""Tokenizers with Meta's Llama 2 API over two backends.

`SentencePieceTokenizer` runs Google's `sentencepiece` (Llama 2's own tokenizer, and
any SentencePiece vocabulary a GGUF file carries, rebuilt as a real SentencePiece model).
`HFTokenizer` runs Hugging Face's `tokenizers` (a `tokenizer.json`, or a byte-level BPE
vocabulary a GGUF file carries). Both answer the same `Tokenizer` interface:

    tok = Tokenizer.from_file("tokenizer.model")      # or a .gguf, tokenizer.json, folder
    ids = tok.encode("Hello", bos=True, eos=False)
    text = tok.decode(ids)

Plain `encode` never reads special tokens written in the text (`"<s>"` is three plain
pieces, as in Meta's code); `encode_with_special` does, for rendered chat templates.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from llama2.errors import Llama2Error
from llama2.weights.common import read_json

__all__ = [
    "END_OF_TURN_PIECES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "llama2_tokenizer_path",
]

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

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")

# GGUF token types (llama.cpp's llama_token_type) -> SentencePiece piece types.
_SPM_PIECE_TYPES = {
    1: spm_pb2.ModelProto.SentencePiece.NORMAL,
    2: spm_pb2.ModelProto.SentencePiece.UNKNOWN,
    3: spm_pb2.ModelProto.SentencePiece.CONTROL,
    4: spm_pb2.ModelProto.SentencePiece.USER_DEFINED,
    5: spm_pb2.ModelProto.SentencePiece.UNUSED,
    6: spm_pb2.ModelProto.SentencePiece.BYTE,
}
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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
        if head == b"GGUF":
            return _from_gguf_file(path)
        if path.suffix == ".json" or head.lstrip()[:1] == b"{":
            return _from_hf_json(path, read_tokenizer_config(path.parent))
        return _from_sentencepiece_file(path, read_tokenizer_config(path.parent))

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
        kind = meta.get("tokenizer.ggml.model")
        builder = _GGUF_BUILDERS.get(kind)
        if builder is None:
            raise Llama2Error(
                f"{source}: unsupported tokenizer model {kind!r} "
                f"(supported: {', '.join(sorted(_GGUF_BUILDERS))})"
            )
        if not meta.get("tokenizer.ggml.tokens"):
            raise Llama2Error(f"{source}: no tokenizer.ggml.tokens vocabulary")
        return builder(meta, source)

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


class SentencePieceTokenizer(Tokenizer):
    """A `sentencepiece` model: Llama 2's tokenizer, exactly as Meta runs it.

    Args:
        processor: The loaded SentencePiece model.
        add_bos: Whether prompts start with BOS by default.
        chat_template: The checkpoint's chat template, if any.
        bos_id: BOS id; the model's own when None.
        eos_id: EOS id; the model's own when None.
        pad_id: Padding id; the model's own when None.
        extra_stop_ids: More ids that end generation.
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        *,
        add_bos: bool = True,
        chat_template: str | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self._sp = processor
        self._specials = {
            processor.id_to_piece(i): i
            for i in range(processor.get_piece_size())
            if processor.is_control(i) and processor.id_to_piece(i)
        }
        self._special_pattern = _alternation(self._specials)
        super().__init__(
            n_words=processor.get_piece_size(),
            bos_id=processor.bos_id() if bos_id is None else bos_id,
            eos_id=processor.eos_id() if eos_id is None else eos_id,
            pad_id=processor.pad_id() if pad_id is None else pad_id,
            add_bos=add_bos,
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
        )

    def encode_with_special(self, s: str) -> list[int]:
        """Encodes text, reading control pieces (`<s>`, `</s>`) written in it as ids.

        Like llama.cpp's `parse_special=True`: the text between special tokens is
        encoded piece by piece, each with SentencePiece's dummy prefix.
        """
        ids: list[int] = []
        for part in _split_specials(s, self._special_pattern):
            if part in self._specials:
                ids.append(self._specials[part])
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def piece_to_id(self, s: str) -> int | None:
        i = self._sp.piece_to_id(s)
        return i if self._sp.id_to_piece(i) == s else None

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (the bytes of a `tokenizer.model` file)."""
        return self._sp.serialized_model_proto()

    def _encode_plain(self, s: str) -> list[int]:
        return self._sp.encode(s)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json, or byte-level BPE from GGUF).

    BOS/EOS are added by this class, never by the tokenizer's post-processor.

    Args:
        tokenizer: The `tokenizers.Tokenizer`.
        bos_id: BOS id, -1 for none.
        eos_id: EOS id, -1 for none.
        pad_id: Padding id, -1 for none.
        add_bos: Whether prompts start with BOS by default.
        chat_template: The checkpoint's chat template, if any.
        extra_stop_ids: More ids that end generation.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int = -1,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self._with_special = tokenizer
        # Plain `encode` reads special added tokens as text: the backend's
        # `encode_special_tokens` switch is turned on for the call, under a lock so that
        # concurrent callers (a server's threads) never see it in the wrong state. (A
        # second backend would avoid the lock at the cost of another vocabulary, ~13 MB
        # for 49k tokens.)
        self._mode_lock = threading.Lock()
        self._specials = {
            t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        super().__init__(
            n_words=tokenizer.get_vocab_size(with_added_tokens=True),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            add_bos=add_bos,
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
        )

    def encode_with_special(self, s: str) -> list[int]:
        with self._mode_lock:
            return self._with_special.encode(s, add_special_tokens=False).ids

    def piece_to_id(self, s: str) -> int | None:
        return self._with_special.token_to_id(s)

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def to_json(self) -> str:
        """The backend as `tokenizer.json` text."""
        return self._with_special.to_str()

    def gguf_pre_tokenizer(self) -> str | None:
        """The `tokenizer.ggml.pre` name whose splitting gives this tokenizer's pre-tokens.

        Compared by behaviour on a probe text covering llama.cpp's cases (spaces,
        newlines, digits, contractions, scripts), so a `tokenizer.json` written with
        different regexes for the same splitting is recognised too.

        Returns:
            The first matching name of `tokenizer.ggml.pre`, None when none matches.
        """
        pre = self._with_special.pre_tokenizer
        if pre is None:
            return None
        wanted = [piece for piece, _ in pre.pre_tokenize_str(_PRE_TOKENIZER_PROBE)]
        for name, spec in _PRE_TOKENIZERS.items():
            if [piece for piece, _ in _pre_tokenizer(spec).pre_tokenize_str(_PRE_TOKENIZER_PROBE)] == wanted:
                return name
        return None

    def _encode_plain(self, s: str) -> list[int]:
        with self._mode_lock:
            self._with_special.encode_special_tokens = True
            try:
                return self._with_special.encode(s, add_special_tokens=False).ids
            finally:
                self._with_special.encode_special_tokens = False

    def _decode(self, ids: list[int]) -> str:
        return self._with_special.decode(ids, skip_special_tokens=True)

    def _id_to_piece(self, i: int) -> str:
        piece = self._with_special.id_to_token(i)
        return "" if piece is None else piece


def llama2_tokenizer_path() -> Path:
    """The path of the Llama 2 SentencePiece model shipped with this package.

    Returns:
        The path of `llama2/data/tokenizer.model` (byte-identical to Meta's).
    """
    return Path(str(resources.files("llama2").joinpath("data", "tokenizer.model")))


# -- special-token splitting -----------------------------------------------------------


def _alternation(pieces: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `pieces`, longest first; None when there are none."""
    ordered = sorted(pieces, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(p) for p in ordered) + ")")


def _split_specials(s: str, pattern: re.Pattern[str] | None) -> Iterator[str]:
    """Splits `s` into special tokens and the non-empty text between them."""
    parts = [s] if pattern is None else pattern.split(s)
    return (p for p in parts if p)


# -- GGUF: SentencePiece vocabularies -------------------------------------------------


def _sentencepiece_from_gguf(meta: Mapping[str, Any], source: str) -> SentencePieceTokenizer:
    """Rebuilds a SentencePiece BPE model from GGUF metadata (`tokenizer.ggml.model == "llama"`)."""
    proto = _spm_model_proto(meta, source)
    try:
        processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except (RuntimeError, OSError, ValueError) as e:
        raise Llama2Error(f"{source}: the SentencePiece vocabulary is invalid ({e})") from e
    ids = _gguf_special_ids(meta)
    return SentencePieceTokenizer(
        processor,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        extra_stop_ids=_gguf_extra_stop_ids(meta),
    )


def _spm_model_proto(meta: Mapping[str, Any], source: str) -> spm_pb2.ModelProto:
    """The SentencePiece ModelProto for a GGUF SentencePiece vocabulary."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise Llama2Error(f"{source}: tokens, scores and token types differ in length")
    unk_id = _gguf_unk_id(types, meta, source)
    proto = spm_pb2.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        entry = proto.pieces.add()
        entry.piece = piece
        entry.score = float(score)
        entry.type = _spm_piece_type(kind, is_unk=i == unk_id)
    _fill_trainer_spec(proto.trainer_spec, tokens, types, meta, unk_id)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(
        meta.get("tokenizer.ggml.remove_extra_whitespaces", False)
    )
    normalizer.escape_whitespaces = True
    return proto


def _spm_piece_type(gguf_type: int, *, is_unk: bool) -> int:
    """The SentencePiece type of a GGUF token; SentencePiece allows one unknown piece."""
    if is_unk:
        return _SPM_PIECE_TYPES[2]
    if gguf_type == 2:
        return _SPM_PIECE_TYPES[_GGUF_CONTROL]
    return _SPM_PIECE_TYPES.get(gguf_type, _SPM_PIECE_TYPES[1])


def _fill_trainer_spec(
    spec: spm_pb2.TrainerSpec,
    tokens: list[str],
    types: list[int],
    meta: Mapping[str, Any],
    unk_id: int,
) -> None:
    """Sets the trainer fields SentencePiece reads when encoding."""
    ids = _gguf_special_ids(meta)
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(
        kind == 6 and _BYTE_PIECE.fullmatch(piece) for piece, kind in zip(tokens, types)
    )
    spec.unk_id = unk_id
    spec.unk_piece = tokens[unk_id]
    spec.bos_id = ids["bos"]
    spec.eos_id = ids["eos"]
    spec.pad_id = -1
    if ids["bos"] >= 0:
        spec.bos_piece = tokens[ids["bos"]]
    if ids["eos"] >= 0:
        spec.eos_piece = tokens[ids["eos"]]


def _gguf_unk_id(types: list[int], meta: Mapping[str, Any], source: str) -> int:
    """The unknown-piece id SentencePiece requires: from metadata, else the type-2 token."""
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, kind in enumerate(types) if kind == 2), None)
    if unk is None or not 0 <= unk < len(types):
        raise Llama2Error(f"{source}: the SentencePiece vocabulary has no unknown token")
    return int(unk)


# -- GGUF: byte-level BPE vocabularies ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text before BPE, for one `tokenizer.ggml.pre` value.

    Attributes:
        splits: Regexes applied in turn, each isolating its matches (llama.cpp's
            `unicode_regex_split`, tokenizers' `Split(..., "isolated")`).
        ignore_merges: A whole pre-token already in the vocabulary is taken as is.
        add_bos: llama.cpp's BOS default when the file does not say.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + _CONTRACTIONS
    + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTIONS
    + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK_RUN = r"[一-龥ࠀ-一가-퟿]+"
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
# llama.cpp's cased-letter class for "deepseek-llm"; code points that Unicode
# normalization would rewrite (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126, U+212A) are escaped.
_DEEPSEEK_LLM_LETTERS = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"  # noqa: E501
)


def _pre_tokenizer_table() -> dict[str, _PreTokenizer]:
    """`tokenizer.ggml.pre` names to llama.cpp's splitting (src/llama-vocab.cpp)."""
    families = {
        # llama.cpp's fallback for "default" (and a missing name), not GPT-2's regex.
        ("default",): _PreTokenizer(
            (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
        ),
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"): _PreTokenizer(
            (_GPT2_SPLIT,)
        ),
        (
            "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
        ): _PreTokenizer((r"\p{N}", _GPT2_SPLIT)),
        (
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2",
        ): _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
        ("dbrx", "smaug-bpe"): _PreTokenizer((_LLAMA3_SPLIT,)),
        (
            "qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo", "f2llmv2",
        ): _PreTokenizer((_QWEN2_SPLIT,)),
        ("tekken",): _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
        ("gpt-4o", "llama4", "kanana2", "minimax-m2"): _PreTokenizer((_GPT4O_SPLIT,)),
        ("falcon",): _PreTokenizer(
            (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]")
        ),
        ("deepseek-coder",): _PreTokenizer(
            (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUN, r"\p{N}")
        ),
        ("deepseek-llm",): _PreTokenizer(
            (
                r"[\r\n]",
                _DEEPSEEK_LLM_LETTERS,
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                _CJK_RUN,
                r"\p{N}+",
            )
        ),
        ("poro-chat", "bloom", "gpt3-finnish"): _PreTokenizer((_BLOOM_SPLIT,)),
        ("viking",): _PreTokenizer((_BLOOM_SPLIT, r"\p{N}")),
    }
    return {name: spec for names, spec in families.items() for name in names}


_PRE_TOKENIZERS = MappingProxyType(_pre_tokenizer_table())

# llama.cpp's `chktxt` (convert_hf_to_gguf_update.py): tells its pre-tokenizers apart.
_PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def _pre_tokenizer(spec: _PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's splitting as a `tokenizers` pre-tokenizer (then GPT-2's byte mapping)."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _bpe_from_gguf(meta: Mapping[str, Any], source: str) -> HFTokenizer:
    """Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model == "gpt2"`)."""
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise Llama2Error(f"{source}: unsupported BPE pre-tokenizer {pre_name!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    try:
        backend = tokenizers.Tokenizer(
            models.BPE(
                {piece: i for i, piece in enumerate(tokens)},
                _gguf_merges(meta, source),
                ignore_merges=pre.ignore_merges,
            )
        )
    except Exception as e:  # tokenizers raises bare Exception on inconsistent merges
        raise Llama2Error(f"{source}: the BPE vocabulary is invalid ({e})") from e
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or ())
    ids = _gguf_special_ids(meta)
    return HFTokenizer(
        backend,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids["pad"],
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
        extra_stop_ids=_gguf_extra_stop_ids(meta),
    )


def _gguf_merges(meta: Mapping[str, Any], source: str) -> list[tuple[str, str]]:
    """The BPE merges, as pairs."""
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise Llama2Error(f"{source}: the BPE vocabulary has no tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise Llama2Error(f"{source}: malformed BPE merge {bad!r}")
    return pairs  # type: ignore[return-value]


def _add_gguf_added_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], types: Sequence[int]
) -> None:
    """Adds control tokens as special and user-defined tokens as always-matched text.

    This follows llama.cpp: control tokens are read from text only with
    `parse_special`, user-defined ones (like `<think>`) always.
    """
    kinds = list(zip(tokens, types))
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in kinds
            if k == _GGUF_CONTROL and t
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in kinds
            if k == _GGUF_USER_DEFINED and t
        ]
    )


# -- GGUF: shared --------------------------------------------------------------------


def _gguf_special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
    """BOS/EOS/padding ids from GGUF metadata, -1 where absent."""
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}
    n = len(meta["tokenizer.ggml.tokens"])
    ids = {}
    for name, key in keys.items():
        value = meta.get(f"tokenizer.ggml.{key}")
        ids[name] = int(value) if value is not None and 0 <= int(value) < n else -1
    return ids


def _gguf_extra_stop_ids(meta: Mapping[str, Any]) -> list[int]:
    """The end-of-turn / end-of-message ids a GGUF names explicitly."""
    keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return [int(meta[k]) for k in keys if meta.get(k) is not None]


_GGUF_BUILDERS = MappingProxyType({"llama": _sentencepiece_from_gguf, "gpt2": _bpe_from_gguf})


# -- files and folders -----------------------------------------------------------------


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(4)
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from e


def _from_folder(folder: Path) -> Tokenizer:
    config = read_tokenizer_config(folder)
    if (folder / "tokenizer.model").is_file():
        return _from_sentencepiece_file(folder / "tokenizer.model", config)
    if (folder / "tokenizer.json").is_file():
        return _from_hf_json(folder / "tokenizer.json", config)
    raise Llama2Error(f"{folder}: no tokenizer.model or tokenizer.json in this folder")


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` of a Hugging Face folder ({} when absent), with `chat_template` resolved.

    The chat template comes from the config (a string, or a list of named templates of
    which "default" wins) or from `chat_template.jinja`.
    """
    path = folder / "tokenizer_config.json"
    config: dict[str, Any] = read_json(path) if path.is_file() else {}
    config["chat_template"] = _pick_chat_template(config.get("chat_template"), folder)
    return config


def _pick_chat_template(value: Any, folder: Path) -> str | None:
    """`chat_template.jinja` when present (as transformers prefers it), else the config's value.

    A list of named templates yields the one named "default" (else the first).
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Llama2Error(f"{jinja}: cannot read ({e})") from e
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


def _from_sentencepiece_file(path: Path, config: Mapping[str, Any]) -> SentencePieceTokenizer:
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError, ValueError) as e:
        raise Llama2Error(f"{path}: not a SentencePiece model ({e})") from e
    add_bos = config.get("add_bos_token")
    return SentencePieceTokenizer(
        processor,
        add_bos=add_bos if isinstance(add_bos, bool) else True,
        chat_template=config.get("chat_template"),
    )


def _from_hf_json(path: Path, config: Mapping[str, Any]) -> HFTokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception on a bad file
        raise Llama2Error(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
    bos_id = _config_token_id(backend, config, "bos_token", _BOS_GUESSES)
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = bos_id >= 0 and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return HFTokenizer(
        backend,
        bos_id=bos_id,
        eos_id=_config_token_id(backend, config, "eos_token", _EOS_GUESSES),
        pad_id=_config_token_id(backend, config, "pad_token", ()),
        add_bos=add_bos,
        chat_template=config.get("chat_template"),
    )


def _config_token_id(
    backend: tokenizers.Tokenizer,
    config: Mapping[str, Any],
    key: str,
    guesses: Sequence[str],
) -> int:
    """The id of special token `key` from tokenizer_config.json, else a known name; -1 if none."""
    if key in config:
        value = config[key]
        text = value.get("content") if isinstance(value, dict) else value
        candidates: Sequence[str] = (text,) if isinstance(text, str) else ()
    else:
        candidates = guesses
    for text in candidates:
        i = backend.token_to_id(text)
        if i is not None:
            return i
    return -1


def _from_gguf_file(path: Path) -> Tokenizer:
    """Reads a GGUF file's tokenizer metadata (no tensors) and builds its tokenizer."""
    from .weights.gguf import read_gguf_metadata  # the bounds-checked GGUF parser

    meta = {k: v for k, v in read_gguf_metadata(path).items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(meta, source=str(path))
