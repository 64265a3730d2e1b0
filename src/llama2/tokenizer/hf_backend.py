"""`HFTokenizer`: Hugging Face's `tokenizers` behind the `Tokenizer` interface.

A `tokenizer.json` (special ids from `tokenizer_config.json`), or a byte-level BPE
vocabulary a GGUF file carries (rebuilt by `llama2.tokenizer.gguf_vocab` with llama.cpp's
pre-tokenizer of its `tokenizer.ggml.pre`).
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from gguf.constants import Keys

from ..errors import Llama2Error, Llama2Warning
from ..weights.tokenizer_files import HF_FILE
from . import gguf_vocab, pretokenizers
from .base import Tokenizer

__all__ = ["HFTokenizer"]

K = Keys.Tokenizer

_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")


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

    file_name = HF_FILE
    gguf_model = gguf_vocab.BPE_MODEL

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
        self._specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
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
        return None if pre is None else pretokenizers.name_of(pre)

    # -- files and GGUF ------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, config: Mapping[str, Any]) -> HFTokenizer:
        """Loads a `tokenizer.json`; special ids come from `config`, else from well-known names.

        BOS is added by default when `config` says so (`add_bos_token`), or, when it does
        not, when the file's own post-processor adds it.
        """
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception on a bad file
            raise Llama2Error(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        bos_id = _config_token_id(backend, config, "bos_token", _BOS_GUESSES)
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id >= 0 and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=_config_token_id(backend, config, "eos_token", _EOS_GUESSES),
            pad_id=_config_token_id(backend, config, "pad_token", ()),
            add_bos=add_bos,
            chat_template=config.get("chat_template"),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], source: str) -> HFTokenizer:
        """Builds a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model == "gpt2"`)."""
        backend, pre = gguf_vocab.bpe_backend(meta, source)
        ids = gguf_vocab.special_ids(meta)
        return cls(
            backend,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            pad_id=ids["pad"],
            add_bos=bool(meta.get(K.ADD_BOS, pre.add_bos)),
            chat_template=meta.get(K.CHAT_TEMPLATE),
            extra_stop_ids=gguf_vocab.extra_stop_ids(meta),
        )

    def vocabulary_file(self) -> bytes:
        """`tokenizer.json` (UTF-8), with a post-processor adding BOS when this model wants it."""
        data = json.loads(self.to_json())
        if self.add_bos and self.bos_token is not None:
            data["post_processor"] = _bos_post_processor(self.bos_token, self.bos_id)
        return json.dumps(data, ensure_ascii=False).encode("utf-8")

    def gguf_vocabulary(self) -> dict[str, Any]:
        """Tokens, token types, merges and the llama.cpp pre-tokenizer of this splitting.

        A splitting llama.cpp does not know is written as "default", with a `Llama2Warning`.

        Raises:
            Llama2Error: The vocabulary is not byte-level BPE.
        """
        pre = self.gguf_pre_tokenizer()
        keys = gguf_vocab.bpe_keys(self._with_special, self.n_words, pre or "default")
        if pre is None:
            message = "the tokenizer's pre-tokenizer matches none llama.cpp knows; writing 'default'"
            warnings.warn(message, Llama2Warning, stacklevel=3)
        return keys

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


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """A `tokenizer.json` post-processor that puts BOS before each sequence (as transformers reads it)."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
