"""Vocabularies in GGUF metadata, both ways: rebuilt for a backend, and described for a GGUF file.

A GGUF file carries its vocabulary as `tokenizer.ggml.*` arrays. A SentencePiece one
(`tokenizer.ggml.model == "llama"`: tokens, scores, token types) is rebuilt here as a real
SentencePiece `ModelProto`; a byte-level BPE one (`"gpt2"`: tokens, merges, pre-tokenizer
name) as a `tokenizers.Tokenizer`. The `*_keys` functions go the other way. Token types are
llama.cpp's (`gguf.constants.TokenType`); SentencePiece piece types use the same numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from gguf.constants import Keys, TokenType
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, decoders, models

from ..errors import Llama2Error
from . import pretokenizers
from .pretokenizers import PreTokenizerSpec

__all__ = [
    "bpe_backend",
    "bpe_keys",
    "extra_stop_ids",
    "sentencepiece_keys",
    "sentencepiece_model_proto",
    "special_ids",
]

K = Keys.Tokenizer

SENTENCEPIECE_MODEL = "llama"
"""`tokenizer.ggml.model` of SentencePiece vocabularies."""
BPE_MODEL = "gpt2"
"""`tokenizer.ggml.model` of byte-level BPE vocabularies."""

_SPM_PIECE_TYPES = {
    TokenType.NORMAL: spm_pb2.ModelProto.SentencePiece.NORMAL,
    TokenType.UNKNOWN: spm_pb2.ModelProto.SentencePiece.UNKNOWN,
    TokenType.CONTROL: spm_pb2.ModelProto.SentencePiece.CONTROL,
    TokenType.USER_DEFINED: spm_pb2.ModelProto.SentencePiece.USER_DEFINED,
    TokenType.UNUSED: spm_pb2.ModelProto.SentencePiece.UNUSED,
    TokenType.BYTE: spm_pb2.ModelProto.SentencePiece.BYTE,
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# -- shared ---------------------------------------------------------------------------


def special_ids(meta: Mapping[str, Any]) -> dict[str, int]:
    """BOS/EOS/padding ids (keys "bos", "eos", "pad") from GGUF metadata, -1 where absent."""
    keys = {"bos": K.BOS_ID, "eos": K.EOS_ID, "pad": K.PAD_ID}
    n = len(meta[K.LIST])
    ids = {}
    for name, key in keys.items():
        value = meta.get(key)
        ids[name] = int(value) if value is not None and 0 <= int(value) < n else -1
    return ids


def extra_stop_ids(meta: Mapping[str, Any]) -> list[int]:
    """The end-of-turn / end-of-message ids a GGUF names explicitly."""
    return [int(meta[k]) for k in (K.EOT_ID, K.EOM_ID) if meta.get(k) is not None]


# -- SentencePiece ------------------------------------------------------------------------


def sentencepiece_model_proto(meta: Mapping[str, Any], source: str) -> spm_pb2.ModelProto:
    """The SentencePiece BPE `ModelProto` for a GGUF SentencePiece vocabulary.

    Raises:
        Llama2Error: The arrays differ in length, or there is no unknown token.
    """
    tokens = list(meta[K.LIST])
    scores = list(meta.get(K.SCORES) or [0.0] * len(tokens))
    types = list(meta.get(K.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise Llama2Error(f"{source}: tokens, scores and token types differ in length")
    unk_id = _unk_id(types, meta, source)
    proto = spm_pb2.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        entry = proto.pieces.add()
        entry.piece = piece
        entry.score = float(score)
        entry.type = _spm_piece_type(kind, is_unk=i == unk_id)
    _fill_trainer_spec(proto.trainer_spec, tokens, types, meta, unk_id)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get(K.ADD_PREFIX, True))
    normalizer.remove_extra_whitespaces = bool(meta.get(K.REMOVE_EXTRA_WS, False))
    normalizer.escape_whitespaces = True
    return proto


def sentencepiece_keys(proto: spm_pb2.ModelProto) -> dict[str, Any]:
    """The GGUF keys describing a SentencePiece model's vocabulary (no special ids)."""
    known = set(TokenType)
    types = [int(piece.type if piece.type in known else TokenType.NORMAL) for piece in proto.pieces]
    meta: dict[str, Any] = {
        K.MODEL: SENTENCEPIECE_MODEL,
        K.PRE: "default",
        K.LIST: [piece.piece for piece in proto.pieces],
        K.SCORES: [float(piece.score) for piece in proto.pieces],
        K.TOKEN_TYPE: types,
        K.ADD_PREFIX: bool(proto.normalizer_spec.add_dummy_prefix),
    }
    unk = proto.trainer_spec.unk_id
    if 0 <= unk < len(types) and types[unk] == TokenType.UNKNOWN:
        meta[K.UNK_ID] = unk
    return meta


def _spm_piece_type(gguf_type: int, *, is_unk: bool) -> int:
    """The SentencePiece type of a GGUF token; SentencePiece allows one unknown piece."""
    if is_unk:
        return _SPM_PIECE_TYPES[TokenType.UNKNOWN]
    if gguf_type == TokenType.UNKNOWN:
        return _SPM_PIECE_TYPES[TokenType.CONTROL]
    return _SPM_PIECE_TYPES.get(gguf_type, _SPM_PIECE_TYPES[TokenType.NORMAL])


def _fill_trainer_spec(
    spec: spm_pb2.TrainerSpec,
    tokens: list[str],
    types: list[int],
    meta: Mapping[str, Any],
    unk_id: int,
) -> None:
    """Sets the trainer fields SentencePiece reads when encoding."""
    ids = special_ids(meta)
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(
        kind == TokenType.BYTE and _BYTE_PIECE.fullmatch(piece) for piece, kind in zip(tokens, types)
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


def _unk_id(types: list[int], meta: Mapping[str, Any], source: str) -> int:
    """The unknown-piece id SentencePiece requires: from metadata, else the first UNKNOWN token."""
    unk = meta.get(K.UNK_ID)
    if unk is None:
        unk = next((i for i, kind in enumerate(types) if kind == TokenType.UNKNOWN), None)
    if unk is None or not 0 <= unk < len(types):
        raise Llama2Error(f"{source}: the SentencePiece vocabulary has no unknown token")
    return int(unk)


# -- byte-level BPE -----------------------------------------------------------------------


def bpe_backend(meta: Mapping[str, Any], source: str) -> tuple[tokenizers.Tokenizer, PreTokenizerSpec]:
    """A byte-level BPE `tokenizers.Tokenizer` for GGUF metadata, and its pre-tokenizer's spec.

    Raises:
        Llama2Error: The pre-tokenizer is unknown, or the merges are missing or invalid.
    """
    pre_name = meta.get(K.PRE) or "default"
    pre = pretokenizers.PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise Llama2Error(f"{source}: unsupported BPE pre-tokenizer {pre_name!r}")
    tokens = list(meta[K.LIST])
    try:
        backend = tokenizers.Tokenizer(
            models.BPE(
                {piece: i for i, piece in enumerate(tokens)},
                _merges(meta, source),
                ignore_merges=pre.ignore_merges,
            )
        )
    except Exception as e:  # tokenizers raises bare Exception on inconsistent merges
        raise Llama2Error(f"{source}: the BPE vocabulary is invalid ({e})") from e
    backend.pre_tokenizer = pretokenizers.build(pre)
    backend.decoder = decoders.ByteLevel()
    _add_added_tokens(backend, tokens, meta.get(K.TOKEN_TYPE) or ())
    return backend, pre


def bpe_keys(backend: tokenizers.Tokenizer, n_words: int, pre_name: str) -> dict[str, Any]:
    """The GGUF keys describing a byte-level BPE vocabulary (no special ids).

    Raises:
        Llama2Error: The backend is not byte-level BPE (all GGUF takes from tokenizer.json).
    """
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise Llama2Error(
            "this tokenizer.json is not a byte-level BPE vocabulary, which is all GGUF takes from tokenizer.json; "
            "pass the SentencePiece tokenizer.model with --tokenizer"
        )
    tokens, types = _bpe_vocabulary(n_words, model["vocab"], data.get("added_tokens") or [])
    return {
        K.MODEL: BPE_MODEL,
        K.PRE: pre_name,
        K.LIST: tokens,
        K.TOKEN_TYPE: types,
        K.MERGES: [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
    }


def _bpe_vocabulary(n_words: int, vocab: dict[str, int], added: list[dict]) -> tuple[list[str], list[int]]:
    """Token text and GGUF type by id; ids nothing names become unused ``[PADn]`` tokens (as llama.cpp does)."""
    tokens = [f"[PAD{i}]" for i in range(n_words)]
    types = [TokenType.UNUSED] * n_words
    for text, i in vocab.items():
        if 0 <= i < n_words:
            tokens[i], types[i] = text, TokenType.NORMAL
    for token in added:
        i = token.get("id", -1)
        if 0 <= i < n_words:
            tokens[i] = token["content"]
            types[i] = TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED
    return tokens, [int(t) for t in types]


def _merges(meta: Mapping[str, Any], source: str) -> list[tuple[str, str]]:
    """The BPE merges, as pairs."""
    merges = meta.get(K.MERGES)
    if not merges:
        raise Llama2Error(f"{source}: the BPE vocabulary has no {K.MERGES}")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise Llama2Error(f"{source}: malformed BPE merge {bad!r}")
    return pairs  # type: ignore[return-value]


def _add_added_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: Sequence[int]) -> None:
    """Adds control tokens as special and user-defined tokens as always-matched text.

    This follows llama.cpp: control tokens are read from text only with
    `parse_special`, user-defined ones (like `<think>`) always.
    """
    kinds = list(zip(tokens, types))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in kinds if k == TokenType.CONTROL and t]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in kinds if k == TokenType.USER_DEFINED and t]
    )
