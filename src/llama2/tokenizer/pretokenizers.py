"""llama.cpp's pre-tokenizers (the splitting before byte-level BPE), by `tokenizer.ggml.pre` name.

A GGUF byte-level BPE vocabulary names its pre-tokenizer; llama.cpp hard-codes the
regexes of each name (src/llama-vocab.cpp). `PRE_TOKENIZERS` holds them (about 45 names in
13 families), `build` turns one into a `tokenizers` pre-tokenizer, and `name_of` finds
the name of a `tokenizers` pre-tokenizer by comparing its splitting on `PROBE`.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from tokenizers import Regex, pre_tokenizers

__all__ = ["PRE_TOKENIZERS", "PROBE", "PreTokenizerSpec", "build", "name_of"]


@dataclasses.dataclass(frozen=True)
class PreTokenizerSpec:
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
_DEEPSEEK_LLM_LETTERS = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"  # noqa: E501


def _pre_tokenizer_table() -> dict[str, PreTokenizerSpec]:
    """`tokenizer.ggml.pre` names to llama.cpp's splitting (src/llama-vocab.cpp)."""
    families = {
        # llama.cpp's fallback for "default" (and a missing name), not GPT-2's regex.
        ("default",): PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"): PreTokenizerSpec((_GPT2_SPLIT,)),
        (
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
        ): PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT)),
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
        ): PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
        ("dbrx", "smaug-bpe"): PreTokenizerSpec((_LLAMA3_SPLIT,)),
        (
            "qwen2",
            "deepseek-r1-qwen",
            "stablelm2",
            "hunyuan",
            "megrez",
            "kormo",
            "f2llmv2",
        ): PreTokenizerSpec((_QWEN2_SPLIT,)),
        ("tekken",): PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
        ("gpt-4o", "llama4", "kanana2", "minimax-m2"): PreTokenizerSpec((_GPT4O_SPLIT,)),
        ("falcon",): PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]")),
        ("deepseek-coder",): PreTokenizerSpec((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUN, r"\p{N}")),
        ("deepseek-llm",): PreTokenizerSpec(
            (
                r"[\r\n]",
                _DEEPSEEK_LLM_LETTERS,
                r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
                r"\s+$",
                _CJK_RUN,
                r"\p{N}+",
            )
        ),
        ("poro-chat", "bloom", "gpt3-finnish"): PreTokenizerSpec((_BLOOM_SPLIT,)),
        ("viking",): PreTokenizerSpec((_BLOOM_SPLIT, r"\p{N}")),
    }
    return {name: spec for names, spec in families.items() for name in names}


PRE_TOKENIZERS = MappingProxyType(_pre_tokenizer_table())

# llama.cpp's `chktxt` (convert_hf_to_gguf_update.py): tells its pre-tokenizers apart.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


def build(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's splitting as a `tokenizers` pre-tokenizer (then GPT-2's byte mapping)."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def name_of(pre: pre_tokenizers.PreTokenizer) -> str | None:
    """The first `tokenizer.ggml.pre` name whose splitting of `PROBE` is `pre`'s; None when none is."""
    wanted = _pre_tokens(pre)
    return next((name for name, spec in PRE_TOKENIZERS.items() if _pre_tokens(build(spec)) == wanted), None)


def _pre_tokens(pre: pre_tokenizers.PreTokenizer) -> list[str]:
    return [piece for piece, _ in pre.pre_tokenize_str(PROBE)]
