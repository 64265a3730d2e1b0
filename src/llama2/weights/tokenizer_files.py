"""A tokenizer's files: `tokenizer_config.json` read, and the tokenizer written out for each format.

SentencePiece vocabularies (Llama 2's) travel as the SentencePiece model itself
(`tokenizer.model`), or as GGUF's tokens/scores/types arrays, which llama.cpp reads the
same way. Byte-level BPE vocabularies travel as `tokenizer.json`, or as GGUF's tokens,
merges and pre-tokenizer name. Special ids and the chat template go with them. What
differs by backend comes from the tokenizer itself (`Tokenizer.vocabulary_file`,
`Tokenizer.gguf_vocabulary`), so this module needs no tokenizer class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf.constants import Keys

from ..errors import Llama2Error, Llama2Warning
from .common import atomic_output, read_json, write_json

if TYPE_CHECKING:  # annotations only: llama2.tokenizer reads its config files here
    from ..tokenizer import Tokenizer

K = Keys.Tokenizer

SENTENCEPIECE_FILE = "tokenizer.model"
"""A SentencePiece model; the only tokenizer file Meta's format (and Meta's code) has."""
HF_FILE = "tokenizer.json"
"""A Hugging Face `tokenizers` vocabulary."""
TOKENIZER_FILES = (SENTENCEPIECE_FILE, HF_FILE)
"""The tokenizer files a checkpoint folder may hold, in the order they are looked for."""

# transformers' tokenizer class and extra config for each kind of vocabulary file.
_HF_TOKENIZER_CLASSES = {
    SENTENCEPIECE_FILE: ("LlamaTokenizer", {"legacy": False, "sp_model_kwargs": {}}),
    HF_FILE: ("PreTrainedTokenizerFast", {}),
}


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def find_tokenizer_file(*folders: Path) -> Path | None:
    """The first of `TOKENIZER_FILES` in the first of `folders` that holds one; None when none does."""
    for folder in folders:
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """`tokenizer_config.json` of a Hugging Face folder ({} when absent), with `chat_template` resolved.

    The chat template comes from the config (a string, or a list of named templates of
    which "default" wins) or from `chat_template.jinja`.

    Raises:
        Llama2Error: A file is there but unreadable or not a JSON object.
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


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of `tokenizer`, where it has them."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {key: value for key, value in ids.items() if value >= 0}


# ---------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------


def gguf_tokenizer_metadata(tokenizer: Tokenizer, chat_template: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys describing `tokenizer`, as plain python values.

    Raises:
        Llama2Error: a `tokenizer.json` that is not byte-level BPE (llama.cpp reads
            SentencePiece vocabularies from their model, so pass ``tokenizer.model``).
    """
    meta = tokenizer.gguf_vocabulary()
    ids = {K.BOS_ID: tokenizer.bos_id, K.EOS_ID: tokenizer.eos_id, K.PAD_ID: tokenizer.pad_id}
    meta.update({key: value for key, value in ids.items() if value >= 0})
    meta[K.ADD_BOS] = bool(tokenizer.add_bos)
    meta[K.ADD_EOS] = False
    template = chat_template or tokenizer.chat_template
    if template:
        meta[K.CHAT_TEMPLATE] = template
    return meta


# ---------------------------------------------------------------------------------------
# Hugging Face and Meta folders
# ---------------------------------------------------------------------------------------


def write_hf_tokenizer(folder: Path, tokenizer: Tokenizer, chat_template: str | None, max_seq_len: int) -> None:
    """Write the tokenizer files `transformers.AutoTokenizer` loads into `folder`.

    SentencePiece: ``tokenizer.model`` with ``LlamaTokenizer`` in ``tokenizer_config.json``.
    Byte-level BPE: ``tokenizer.json`` (adding BOS when the model wants it) with
    ``PreTrainedTokenizerFast``. Both also get ``special_tokens_map.json``.
    """
    specials = tokenizer.special_token_map()
    _write_bytes(folder / tokenizer.file_name, tokenizer.vocabulary_file())
    tokenizer_class, extra = _HF_TOKENIZER_CLASSES[tokenizer.file_name]
    config = {
        "tokenizer_class": tokenizer_class,
        **specials,
        "add_bos_token": bool(tokenizer.add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        **extra,
    }
    template = chat_template or tokenizer.chat_template
    if template:
        config["chat_template"] = template
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", specials)


def write_meta_tokenizer(folder: Path, tokenizer: Tokenizer, chat_template: str | None) -> None:
    """Write `tokenizer.model` into a Meta folder (and the chat template, if any, beside it).

    Meta's format has SentencePiece tokenizers only. A byte-level BPE vocabulary is
    written as ``tokenizer.json`` instead, which this library and `transformers` read
    but Meta's own code does not; a `Llama2Warning` says so.
    """
    template = chat_template or tokenizer.chat_template
    config: dict[str, Any] = {"chat_template": template} if template else {}
    if tokenizer.file_name != SENTENCEPIECE_FILE:
        warnings.warn(
            f"{folder.name}: the vocabulary is byte-level BPE, which Meta's format has no tokenizer.model for; "
            f"wrote {tokenizer.file_name} (read by llama2 and transformers, not by Meta's code)",
            Llama2Warning,
            stacklevel=3,
        )
        config.update(tokenizer.special_token_map(), add_bos_token=bool(tokenizer.add_bos))
    _write_bytes(folder / tokenizer.file_name, tokenizer.vocabulary_file())
    if config:
        write_json(folder / "tokenizer_config.json", config)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as temp:
        temp.write_bytes(data)
