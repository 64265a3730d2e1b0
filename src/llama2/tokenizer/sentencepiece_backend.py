"""`SentencePieceTokenizer`: Google's `sentencepiece` behind the `Tokenizer` interface.

Llama 2's own tokenizer (`llama2_tokenizer_path`, byte-identical to Meta's), any
`tokenizer.model`, and any SentencePiece vocabulary a GGUF file carries (rebuilt as a real
SentencePiece model by `llama2.tokenizer.gguf_vocab`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import sentencepiece as spm
from gguf.constants import Keys
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from ..errors import Llama2Error
from ..weights.tokenizer_files import SENTENCEPIECE_FILE
from . import gguf_vocab
from .base import Tokenizer, special_pattern, split_specials

__all__ = ["SentencePieceTokenizer", "llama2_tokenizer_path"]

K = Keys.Tokenizer


def llama2_tokenizer_path() -> Path:
    """The path of the Llama 2 SentencePiece model shipped with this package.

    Returns:
        The path of `llama2/data/tokenizer.model` (byte-identical to Meta's).
    """
    return Path(str(resources.files("llama2").joinpath("data", "tokenizer.model")))


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

    file_name = SENTENCEPIECE_FILE
    gguf_model = gguf_vocab.SENTENCEPIECE_MODEL

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
        self._special_pattern = special_pattern(self._specials)
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
        for part in split_specials(s, self._special_pattern):
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

    # -- files and GGUF ------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, config: Mapping[str, Any]) -> SentencePieceTokenizer:
        """Loads a SentencePiece `.model` file (BOS default from `config`'s `add_bos_token`)."""
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError, ValueError) as e:
            raise Llama2Error(f"{path}: not a SentencePiece model ({e})") from e
        add_bos = config.get("add_bos_token")
        return cls(
            processor,
            add_bos=add_bos if isinstance(add_bos, bool) else True,
            chat_template=config.get("chat_template"),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], source: str) -> SentencePieceTokenizer:
        """Rebuilds a SentencePiece BPE model from GGUF metadata (`tokenizer.ggml.model == "llama"`)."""
        proto = gguf_vocab.sentencepiece_model_proto(meta, source)
        try:
            processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (RuntimeError, OSError, ValueError) as e:
            raise Llama2Error(f"{source}: the SentencePiece vocabulary is invalid ({e})") from e
        ids = gguf_vocab.special_ids(meta)
        return cls(
            processor,
            add_bos=bool(meta.get(K.ADD_BOS, True)),
            chat_template=meta.get(K.CHAT_TEMPLATE),
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            pad_id=ids["pad"],
            extra_stop_ids=gguf_vocab.extra_stop_ids(meta),
        )

    def vocabulary_file(self) -> bytes:
        """The `tokenizer.model` bytes (`model_proto`)."""
        return self.model_proto()

    def gguf_vocabulary(self) -> dict[str, Any]:
        """Tokens, scores and token types, as llama.cpp reads a SentencePiece vocabulary."""
        return gguf_vocab.sentencepiece_keys(self._proto())

    def special_token_map(self) -> dict[str, str]:
        """BOS/EOS/padding, and the unknown piece SentencePiece models have."""
        pieces = super().special_token_map()
        unk = self._proto().trainer_spec.unk_id
        if 0 <= unk < self.n_words:
            pieces["unk_token"] = self._id_to_piece(unk)
        return pieces

    def _proto(self) -> spm_pb2.ModelProto:
        return spm_pb2.ModelProto.FromString(self.model_proto())

    def _encode_plain(self, s: str) -> list[int]:
        return self._sp.encode(s)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)
