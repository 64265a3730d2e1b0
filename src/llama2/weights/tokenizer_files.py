"""A tokenizer written out for each format: GGUF metadata, Hugging Face files, Meta's tokenizer.model.

SentencePiece vocabularies (Llama 2's) travel as the SentencePiece model itself
(`tokenizer.model`), or as GGUF's tokens/scores/types arrays, which llama.cpp reads the
same way. Byte-level BPE vocabularies travel as `tokenizer.json`, or as GGUF's tokens,
merges and pre-tokenizer name. Special ids and the chat template go with them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from ..errors import Llama2Error, Llama2Warning
from ..tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from .common import atomic_output, write_json

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# SentencePiece piece types use the same numbers as GGUF token types.
_SPM_TYPES = {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}


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
    if isinstance(tokenizer, SentencePieceTokenizer):
        meta = _sentencepiece_metadata(tokenizer)
    elif isinstance(tokenizer, HFTokenizer):
        meta = _bpe_metadata(tokenizer)
    else:
        raise Llama2Error(f"cannot describe a {type(tokenizer).__name__} in GGUF")
    ids = {"tokenizer.ggml.bos_token_id": tokenizer.bos_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
           "tokenizer.ggml.padding_token_id": tokenizer.pad_id}  # fmt: skip
    meta.update({key: value for key, value in ids.items() if value >= 0})
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    template = chat_template or tokenizer.chat_template
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _sentencepiece_metadata(tokenizer: SentencePieceTokenizer) -> dict[str, Any]:
    proto = spm_pb2.ModelProto.FromString(tokenizer.model_proto())
    types = [piece.type if piece.type in _SPM_TYPES else NORMAL for piece in proto.pieces]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [piece.piece for piece in proto.pieces],
        "tokenizer.ggml.scores": [float(piece.score) for piece in proto.pieces],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    unk = proto.trainer_spec.unk_id
    if 0 <= unk < len(types) and types[unk] == UNKNOWN:
        meta["tokenizer.ggml.unknown_token_id"] = unk
    return meta


def _bpe_metadata(tokenizer: HFTokenizer) -> dict[str, Any]:
    data = json.loads(tokenizer.to_json())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise Llama2Error(
            "this tokenizer.json is not a byte-level BPE vocabulary, which is all GGUF takes from tokenizer.json; "
            "pass the SentencePiece tokenizer.model with --tokenizer"
        )
    pre = tokenizer.gguf_pre_tokenizer()
    if pre is None:
        message = "the tokenizer's pre-tokenizer matches none llama.cpp knows; writing 'default'"
        warnings.warn(message, Llama2Warning, stacklevel=3)
    tokens, types = _bpe_vocabulary(tokenizer.n_words, model["vocab"], data.get("added_tokens") or [])
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre or "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
    }


def _bpe_vocabulary(n_words: int, vocab: dict[str, int], added: list[dict]) -> tuple[list[str], list[int]]:
    """Token text and GGUF type by id; ids nothing names become unused ``[PADn]`` tokens (as llama.cpp does)."""
    tokens = [f"[PAD{i}]" for i in range(n_words)]
    types = [UNUSED] * n_words
    for text, i in vocab.items():
        if 0 <= i < n_words:
            tokens[i], types[i] = text, NORMAL
    for token in added:
        i = token.get("id", -1)
        if 0 <= i < n_words:
            tokens[i], types[i] = token["content"], CONTROL if token.get("special") else USER_DEFINED
    return tokens, types


# ---------------------------------------------------------------------------------------
# Hugging Face and Meta folders
# ---------------------------------------------------------------------------------------


def write_hf_tokenizer(folder: Path, tokenizer: Tokenizer, chat_template: str | None, max_seq_len: int) -> None:
    """Write the tokenizer files `transformers.AutoTokenizer` loads into `folder`.

    SentencePiece: ``tokenizer.model`` with ``LlamaTokenizer`` in ``tokenizer_config.json``.
    Byte-level BPE: ``tokenizer.json`` (adding BOS when the model wants it) with
    ``PreTrainedTokenizerFast``. Both also get ``special_tokens_map.json``.
    """
    specials = _special_tokens(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer):
        _write_bytes(folder / "tokenizer.model", tokenizer.model_proto())
        tokenizer_class, extra = "LlamaTokenizer", {"legacy": False, "sp_model_kwargs": {}}
    else:
        _write_tokenizer_json(folder, tokenizer)
        tokenizer_class, extra = "PreTrainedTokenizerFast", {}
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
    if isinstance(tokenizer, SentencePieceTokenizer):
        _write_bytes(folder / "tokenizer.model", tokenizer.model_proto())
    else:
        warnings.warn(
            f"{folder.name}: the vocabulary is byte-level BPE, which Meta's format has no tokenizer.model for; "
            "wrote tokenizer.json (read by llama2 and transformers, not by Meta's code)",
            Llama2Warning,
            stacklevel=3,
        )
        _write_tokenizer_json(folder, tokenizer)
        config.update(_special_tokens(tokenizer), add_bos_token=bool(tokenizer.add_bos))
    if config:
        write_json(folder / "tokenizer_config.json", config)


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    pieces = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    if isinstance(tokenizer, SentencePieceTokenizer):
        proto = spm_pb2.ModelProto.FromString(tokenizer.model_proto())
        pieces["unk_token"] = proto.trainer_spec.unk_id
    return {key: tokenizer.id_to_piece(i) for key, i in pieces.items() if 0 <= i < tokenizer.n_words}


def _write_tokenizer_json(folder: Path, tokenizer: HFTokenizer) -> None:
    data = json.loads(tokenizer.to_json())
    if tokenizer.add_bos and tokenizer.bos_token is not None:
        bos = tokenizer.bos_token
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        }  # fmt: skip
    with atomic_output(folder / "tokenizer.json") as temp:
        temp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as temp:
        temp.write_bytes(data)
