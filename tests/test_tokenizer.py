"""Tokenizer tests against independent references.

Llama 2: Google's `sentencepiece` running Meta's `tokenizer.model` is the reference for
both our SentencePiece path and the tokenizer rebuilt from `llama2-vocab.gguf`.
Byte-level BPE: `transformers`' own GGUF tokenizer conversion of the default SmolLM2
model (when that file is present), plus a tiny hand-made vocabulary whose ids can be
worked out by hand.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers

from llama2.errors import Llama2Error
from llama2.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    llama2_tokenizer_path,
)

from helpers import LLAMA2_GGUF, LLAMA2_MODEL

LLAMA2_MD5 = "eeec4125e9c7560836b4873b6f8e3025"

# -- seeded text generation -------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog Hello world I'm can't we'll they've "
    "Llama llama tokenizer naïve café résumé über straße don't it's O'Neil "
    "https://example.com/a?b=c foo_bar fooBar CamelCase x86_64 e-mail"
).split()
SPECIALISH = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<unk>",
    "<0x41>",
    "<0x0A>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "▁",
    "▁▁",
)
EMOJI = ("🦙", "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "🤖", "🧪", "🫠", "🐍")
WHITESPACE = (" ", "  ", "\t", "\n", "\r\n", "\n\n", "   ", "\u3000", "\xa0", "\u2028", "\x0b")
RARE_RANGES = (
    (0x0900, 0x097F),  # Devanagari
    (0x0400, 0x04FF),  # Cyrillic
    (0x2200, 0x22FF),  # mathematical operators
    (0xE000, 0xE0FF),  # private use
    (0x0300, 0x036F),  # combining marks
    (0x1D400, 0x1D4FF),  # mathematical alphanumerics
    (0x0E00, 0x0E7F),  # Thai
    (0x0590, 0x05FF),  # Hebrew
    (0x10000, 0x1007F),  # Linear B
    (0x0000, 0x001F),  # C0 controls
)


def _chars(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _ascii_words(rng: random.Random) -> str:
    parts = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    text = rng.choice((" ", " ", "", "\n", ", ")).join(parts)
    return text + rng.choice(("", ".", "!", "?", "...", ";", " "))


def _punctuation(rng: random.Random) -> str:
    return "".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 6)))


def _chinese(rng: random.Random) -> str:
    return _chars(rng, 0x4E00, 0x9FA5, rng.randint(1, 10))


def _emoji(rng: random.Random) -> str:
    fixed = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
    return fixed + _chars(rng, 0x1F300, 0x1FAFF, rng.randint(0, 2))


def _whitespace(rng: random.Random) -> str:
    return "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 5)))


def _rare(rng: random.Random) -> str:
    lo, hi = rng.choice(RARE_RANGES)
    return _chars(rng, lo, hi, rng.randint(1, 6))


def _specialish(rng: random.Random) -> str:
    return rng.choice(("", " ")).join(rng.choice(SPECIALISH) for _ in range(rng.randint(1, 3)))


def _digits(rng: random.Random) -> str:
    run = "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 14)))
    return rng.choice(("", "-", "$", " ", "3.")) + run + rng.choice(("", ",000", "%", " "))


KINDS: dict[str, Callable[[random.Random], str]] = {
    "ascii": _ascii_words,
    "punctuation": _punctuation,
    "chinese": _chinese,
    "emoji": _emoji,
    "whitespace": _whitespace,
    "rare": _rare,
    "specialish": _specialish,
    "digits": _digits,
}

EDGE_CASES = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    " \t\n ",
    " leading",
    "trailing ",
    "  both  ",
    "a  b   c",
    "<s>",
    "</s>",
    "[INST] hi [/INST]",
    "<<SYS>>\nsys\n<</SYS>>\n\n",
    "<unk>",
    "<0x41>",
    "🦙",
    "中文",
    "0",
    "1234567890",
    "Hello, world!",
    "▁",
    "\x00",
    "a\x00b",
]


def texts(seed: int, per_kind: int = 300, mixed: int = 1500) -> Iterator[str]:
    """Edge cases, `per_kind` strings of each kind, and `mixed` strings mixing kinds."""
    rng = random.Random(seed)
    yield from EDGE_CASES
    for make in KINDS.values():
        for _ in range(per_kind):
            yield make(rng)
    makers = list(KINDS.values())
    for _ in range(mixed):
        yield "".join(rng.choice(makers)(rng) for _ in range(rng.randint(2, 5)))


TEXTS = list(texts(seed=20240717))

# -- Llama 2 SentencePiece ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_ref() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.fixture(scope="module", params=["model", "gguf"])
def llama(request: pytest.FixtureRequest) -> Tokenizer:
    path = LLAMA2_MODEL if request.param == "model" else LLAMA2_GGUF
    return Tokenizer.from_file(path)


def test_generated_texts_cover_thousands() -> None:
    assert len(TEXTS) > 3000
    assert len(set(TEXTS)) > 2500


def test_encode_matches_sentencepiece(llama: Tokenizer, sp_ref: spm.SentencePieceProcessor) -> None:
    for s in TEXTS:
        expected = sp_ref.encode(s)
        assert llama.encode(s, bos=False, eos=False) == expected, s
        assert llama.encode(s, bos=True, eos=False) == sp_ref.encode(s, add_bos=True), s
        assert llama.encode(s, bos=False, eos=True) == sp_ref.encode(s, add_eos=True), s
        assert llama.encode(s, bos=True, eos=True) == sp_ref.encode(s, add_bos=True, add_eos=True), s


def test_decode_matches_sentencepiece(llama: Tokenizer, sp_ref: spm.SentencePieceProcessor) -> None:
    round_trips = 0
    for s in TEXTS:
        ids = sp_ref.encode(s, add_bos=True, add_eos=True)
        reference = sp_ref.decode(ids)
        assert llama.decode(ids) == reference, s
        if reference == s:
            round_trips += 1
            assert llama.decode(llama.encode(s, bos=True, eos=True)) == s
    assert round_trips > 0.9 * len(TEXTS)


def test_decode_random_ids_matches_sentencepiece(llama: Tokenizer, sp_ref: spm.SentencePieceProcessor) -> None:
    rng = random.Random(7)
    for _ in range(1000):
        ids = [rng.randrange(32000) for _ in range(rng.randint(0, 20))]
        ids += [rng.randrange(3, 259) for _ in range(rng.randint(0, 3))]  # loose bytes
        assert llama.decode(ids) == sp_ref.decode(ids), ids


@pytest.fixture(scope="module")
def gguf_llama() -> Tokenizer:
    return Tokenizer.from_file(LLAMA2_GGUF)


@settings(max_examples=300, deadline=None)
@given(s=st.text(max_size=40))
def test_hypothesis_text_matches_sentencepiece(
    sp_ref: spm.SentencePieceProcessor, gguf_llama: Tokenizer, s: str
) -> None:
    assert gguf_llama.encode(s, bos=True, eos=False) == sp_ref.encode(s, add_bos=True)
    assert gguf_llama.decode(sp_ref.encode(s)) == sp_ref.decode(sp_ref.encode(s))


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (" ", [259]),
        ("\n", [29871, 13]),
        ("🦙", [29871, 243, 162, 169, 156]),
        ("<s>", [529, 29879, 29958]),
        ("", []),
    ],
)
def test_readme_facts(llama: Tokenizer, text: str, ids: list[int]) -> None:
    assert llama.encode(text, bos=False, eos=False) == ids
    assert llama.encode(text, bos=True, eos=True) == [1, *ids, 2]


def test_decode_drops_bos_eos_and_one_leading_space(llama: Tokenizer) -> None:
    assert llama.decode([1, 29871, 13, 2]) == "\n"
    assert llama.decode([1, 2]) == ""
    assert llama.decode(llama.encode(" hello", bos=True, eos=True)) == " hello"
    assert llama.decode([259]) == " "


def test_llama_attributes(llama: Tokenizer) -> None:
    assert isinstance(llama, SentencePieceTokenizer)
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.n_words) == (1, 2, -1, 32000)
    assert llama.stop_ids == frozenset({2})
    assert (llama.bos_token, llama.eos_token) == ("<s>", "</s>")
    assert llama.add_bos is True
    assert llama.special_tokens() == {"<s>": 1, "</s>": 2}
    assert llama.id_to_piece(0) == "<unk>"
    assert llama.id_to_piece(3) == "<0x00>"
    assert llama.piece_to_id("▁the") == 278
    assert llama.piece_to_id("<0x41>") == 68
    assert llama.piece_to_id("no-such-piece-xyz") is None


def test_encode_with_special_reads_bos_eos_only(llama: Tokenizer, sp_ref: spm.SentencePieceProcessor) -> None:
    inst = "[INST] hi [/INST]"
    assert llama.encode_with_special("<s>" + inst) == [1, *sp_ref.encode(inst)]
    assert llama.encode_with_special("a</s><s>b") == [*sp_ref.encode("a"), 2, 1, *sp_ref.encode("b")]
    assert llama.encode_with_special("<s>") == [1]
    for s in ("<unk>", "[INST]", "<<SYS>>", "<0x41>", "<|im_start|>", "plain text"):
        assert llama.encode_with_special(s) == sp_ref.encode(s)
    for s in TEXTS[:500]:
        if "<s>" not in s and "</s>" not in s:
            assert llama.encode_with_special(s) == sp_ref.encode(s)


def test_builtin_tokenizer_is_metas() -> None:
    path = llama2_tokenizer_path()
    assert path.is_file()
    assert hashlib.md5(path.read_bytes()).hexdigest() == LLAMA2_MD5
    builtin = Tokenizer.from_file(path)
    assert builtin.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]


def test_folder_with_config(tmp_path: Path, sp_ref: spm.SentencePieceProcessor) -> None:
    shutil.copy(LLAMA2_MODEL, tmp_path / "tokenizer.model")
    config = {"add_bos_token": False, "chat_template": "{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.add_bos is False
    assert tok.chat_template == config["chat_template"]
    assert tok.encode("Hi there", bos=False, eos=False) == sp_ref.encode("Hi there")


def test_chat_template_file_and_named_list(tmp_path: Path) -> None:
    shutil.copy(LLAMA2_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text("{{ 'x' }}")
    assert Tokenizer.from_file(tmp_path).chat_template == "{{ 'x' }}"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_file(tmp_path).chat_template == "{{ 'x' }}"  # the file wins, as in transformers
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_file(tmp_path).chat_template == "D"


def test_llama_gguf_has_no_chat_template(llama: Tokenizer) -> None:
    assert llama.chat_template is None


# -- errors -------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(Llama2Error, match="no such tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.model")


def test_folder_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(Llama2Error, match="no tokenizer.model or tokenizer.json"):
        Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.model", b"this is not a model", "not a SentencePiece model"),
        ("tokenizer.json", b"{not json", "not a Hugging Face tokenizer.json"),
        ("broken.gguf", b"GGUF\x03\x00\x00\x00", "not a valid GGUF file"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(Llama2Error, match=message) as info:
        Tokenizer.from_file(path)
    assert str(path) in str(info.value)


def test_bad_tokenizer_config(tmp_path: Path) -> None:
    shutil.copy(LLAMA2_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(Llama2Error, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)


def test_decode_out_of_range(llama: Tokenizer) -> None:
    with pytest.raises(Llama2Error, match="outside the vocabulary"):
        llama.decode([1, 32000])
    with pytest.raises(Llama2Error, match="outside the vocabulary"):
        llama.id_to_piece(-1)


def test_gguf_metadata_errors() -> None:
    with pytest.raises(Llama2Error, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(Llama2Error, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"}, source="x.gguf")
    meta = tiny_bpe_metadata()
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(Llama2Error, match="unsupported BPE pre-tokenizer 'no-such-pre'"):
        Tokenizer.from_gguf_metadata(meta)
    del meta["tokenizer.ggml.merges"]
    meta["tokenizer.ggml.pre"] = "gpt-2"
    with pytest.raises(Llama2Error, match="no tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(meta)


# -- a tiny byte-level BPE vocabulary, ids worked out by hand ----------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_CHARS = bytes_to_unicode()
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_USER_DEFINED = ["<think>"]


def tiny_bpe_metadata(pre: str = "smollm") -> dict[str, object]:
    """3 control tokens, 256 byte tokens, 2 merged tokens (`Ġt`, `Ġth`), 1 user-defined."""
    byte_tokens = [BYTE_CHARS[b] for b in range(256)]
    tokens = TINY_SPECIALS + byte_tokens + ["Ġt", "Ġth"] + TINY_USER_DEFINED
    types = [3] * 3 + [1] * 258 + [4]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ 'x' }}",
    }


def tiny_byte_ids(text: str) -> list[int]:
    """Ids of `text` in the tiny vocabulary when no merge applies: one per UTF-8 byte."""
    return [3 + b for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_bpe_metadata())


def test_tiny_bpe_attributes(tiny: Tokenizer) -> None:
    assert isinstance(tiny, HFTokenizer)
    assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.n_words) == (1, 2, -1, 262)
    assert (tiny.bos_token, tiny.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tiny.add_bos is False
    assert tiny.stop_ids == frozenset({0, 2})
    assert tiny.chat_template == "{{ 'x' }}"
    assert tiny.special_tokens() == {t: i for i, t in enumerate(TINY_SPECIALS)}
    assert tiny.piece_to_id("Ġth") == 260
    assert tiny.id_to_piece(260) == "Ġth"
    assert tiny.piece_to_id("nope") is None


def test_tiny_bpe_encode_by_hand(tiny: Tokenizer) -> None:
    assert tiny.encode("", bos=False, eos=False) == []
    assert tiny.encode("ab", bos=False, eos=False) == tiny_byte_ids("ab")
    assert tiny.encode(" the", bos=True, eos=True) == [1, 260, *tiny_byte_ids("e"), 2]
    assert tiny.encode("a th", bos=False, eos=False) == [*tiny_byte_ids("a"), 260]
    # "smollm" splits digits one by one, so " 1" keeps its space apart: same ids here.
    assert tiny.encode(" 12", bos=False, eos=False) == tiny_byte_ids(" 12")
    assert tiny.encode("é🦙", bos=False, eos=False) == tiny_byte_ids("é🦙")


def test_tiny_bpe_specials_plain_vs_parsed(tiny: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tiny.encode(text, bos=False, eos=False) == tiny_byte_ids(text)
    assert tiny.encode_with_special(text) == [1, *tiny_byte_ids("user\nhi"), 2]
    # user-defined tokens are matched whole in both, as llama.cpp does
    assert tiny.encode("a<think>", bos=False, eos=False) == [*tiny_byte_ids("a"), 261]
    assert tiny.encode_with_special("a<think>") == [*tiny_byte_ids("a"), 261]


def test_tiny_bpe_decode(tiny: Tokenizer) -> None:
    rng = random.Random(3)
    for s in TEXTS[::7]:
        assert tiny.decode(tiny.encode(s, bos=True, eos=True)) == s
        assert tiny.decode(tiny.encode_with_special(s)) == s.replace("<|im_start|>", "").replace(
            "<|im_end|>", ""
        ).replace("<|endoftext|>", "")
    ids = [rng.randrange(3, 259) for _ in range(50)]
    assert tiny.decode([1, *ids, 2]) == bytes(i - 3 for i in ids).decode("utf-8", "replace")


@pytest.mark.parametrize(
    "pre",
    [
        "default",
        "gpt-2",
        "llama-bpe",
        "llama3",
        "qwen2",
        "starcoder",
        "refact",
        "deepseek-llm",
        "deepseek-coder",
        "falcon",
        "tekken",
        "gpt-4o",
        "bloom",
        "viking",
        "dbrx",
    ],
)
def test_known_pre_tokenizers_round_trip(pre: str) -> None:
    tok = Tokenizer.from_gguf_metadata(tiny_bpe_metadata(pre))
    for s in TEXTS[::50]:
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == s


def test_pre_tokenizer_regex_splits() -> None:
    """Byte ids show where the pre-tokenizer cut: `Ġt` only merges inside one piece."""
    gpt2 = Tokenizer.from_gguf_metadata(tiny_bpe_metadata("gpt-2"))
    llama3 = Tokenizer.from_gguf_metadata(tiny_bpe_metadata("llama-bpe"))
    # Both keep " th" in one piece, so the merges apply.
    assert gpt2.encode(" th", bos=False, eos=False) == [260]
    assert llama3.encode(" th", bos=False, eos=False) == [260]
    # Llama 3 adds BOS by default; the file's explicit flag wins.
    meta = tiny_bpe_metadata("llama-bpe")
    del meta["tokenizer.ggml.add_bos_token"]
    assert Tokenizer.from_gguf_metadata(meta).add_bos is True


# -- Hugging Face tokenizer.json ---------------------------------------------------------


def _write_hf_folder(folder: Path, config: dict[str, object] | None) -> None:
    vocab = {c: i for i, c in enumerate(["<s>", "</s>", "<pad>", *BYTE_CHARS.values()])}
    backend = tokenizers.Tokenizer(models.BPE(vocab, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_tokenizer_json_with_config(tmp_path: Path) -> None:
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "pad_token": "<pad>",
        "add_bos_token": True,
        "chat_template": "{{ bos_token }}",
    }
    _write_hf_folder(tmp_path, config)
    tok = Tokenizer.from_file(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 1, 2, True)
    assert tok.chat_template == "{{ bos_token }}"
    byte_ids = [3 + list(BYTE_CHARS).index(b) for b in b"hi <s>"]
    assert tok.encode("hi <s>", bos=True, eos=True) == [0, *byte_ids, 1]
    assert tok.encode_with_special("hi <s>") == [*byte_ids[:3], 0]
    assert tok.decode([0, *byte_ids, 1]) == "hi <s>"
    # a lone tokenizer.json reads its sibling config too
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").eos_id == 1


def test_hf_tokenizer_json_without_config_guesses(tmp_path: Path) -> None:
    _write_hf_folder(tmp_path, None)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, -1)
    assert tok.add_bos is False  # no post-processor adds it
    assert tok.chat_template is None


# -- SmolLM2 (the default model) against transformers' GGUF conversion -------------------


SMOL_TEXTS = list(texts(seed=99, per_kind=40, mixed=200)) + [
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<repo_name>y<filename>z",
    "Hello<|im_end|>",
    " over  0195 and\t\t42",
]


@pytest.mark.model
def test_smollm2_attributes(smollm2_tokenizers: tuple[Tokenizer, object]) -> None:
    ours, ref = smollm2_tokenizers
    assert isinstance(ours, HFTokenizer)
    assert ours.n_words == len(ref) == 49152
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.add_bos is False
    assert ours.stop_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>


@pytest.mark.model
def test_smollm2_encode_matches_transformers(smollm2_tokenizers: tuple[Tokenizer, object]) -> None:
    ours, ref = smollm2_tokenizers
    for s in SMOL_TEXTS:
        plain = ref(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.encode(s, bos=False, eos=False) == plain, s
        assert ours.encode_with_special(s) == ref.encode(s, add_special_tokens=False), s


@pytest.mark.model
def test_smollm2_decode_matches_transformers(smollm2_tokenizers: tuple[Tokenizer, object]) -> None:
    ours, ref = smollm2_tokenizers
    for s in SMOL_TEXTS:
        ids = ref.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    rng = random.Random(11)
    for _ in range(200):
        ids = [rng.randrange(49152) for _ in range(rng.randint(0, 12))]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
