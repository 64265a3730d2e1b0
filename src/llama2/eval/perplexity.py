"""Perplexity of texts counted the way llama.cpp, Hugging Face's guide or lm-evaluation-harness count it."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..errors import Llama2Error
from .scoring import Moments, target_nll, window_log_probs
from .windows import Window, llamacpp_windows, rolling_windows, strided_windows

METHODS = {
    "llamacpp": "llama.cpp llama-perplexity: the text tokenized once (BOS first when the vocabulary adds it), "
    "non-overlapping chunks of ctx tokens (the tail dropped), each chunk's first token set to BOS when the "
    "vocabulary adds it, tokens ctx/2+1 .. ctx-1 of each chunk scored; PPL = exp(mean token NLL), "
    "+/- PPL * standard error of the NLL",
    "strided": "Hugging Face perplexity guide: windows of ctx tokens starting every stride tokens (BOS first when "
    "the tokenizer adds it), only the labels past the previous window's end kept; "
    "PPL = exp(sum(window mean NLL * (trg_len - 1)) / sum(trg_len - 1)) as the guide averages; "
    "+/- from the per-token NLL as llama.cpp",
    "rolling": "lm-evaluation-harness 0.4.13 (HFLM) loglikelihood_rolling: each document tokenized as the tokenizer "
    "does by default (BOS first when the model adds BOS) after a BOS (else EOS) prefix token, disjoint rolling "
    "windows of ctx tokens, every token (a leading BOS included) scored once; token PPL = exp(sum NLL / tokens), "
    "word_perplexity = exp(sum NLL / len(re.split(r'\\s+', doc))), bits_per_byte = sum NLL / UTF-8 bytes / ln 2",
}
MODES = tuple(METHODS)


@dataclass
class TextScore:
    """What one text contributed."""

    name: str
    tokens: int
    windows: int
    tokens_scored: int = 0
    nll_sum: float = 0.0
    counted: int = 0  # tokens the mode's average divides by
    counted_nll: float = 0.0  # the NLL the mode's average sums
    words: int = 0
    bytes: int = 0


@dataclass
class PerplexityResult:
    """Perplexity over one or more texts, with how it was counted.

    `ppl` is exp(counted_nll / counted); `ppl_error` is ppl times the standard error of
    the per-token NLL (llama.cpp's +/-). Rolling mode adds the harness's
    `word_perplexity`, `byte_perplexity` and `bits_per_byte`, pooled over documents as the
    harness pools them (sum of log-likelihoods over sum of words or bytes).
    """

    mode: str
    method: str
    ctx: int
    stride: int | None
    tokens_scored: int
    counted_tokens: int
    ppl: float
    ppl_error: float
    seconds: float
    files: list[dict] = field(default_factory=list)
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (rolling-only fields left out in other modes)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "stride"}


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them: ``len(re.split(r"\\s+", doc))`` (edges count as empty words)."""
    return len(re.split(r"\s+", text))


def harness_encode(tokenizer, text: str, special: bool = True) -> list[int]:
    """lm-evaluation-harness 0.4.13 HFLM's `tok_encode` with `add_bos_token` unset: the tokenizer's default
    special tokens (BOS when the model adds it, unless the text already starts with the BOS text)."""
    bos_text = tokenizer.bos_token or ""
    bos = special and tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
    return tokenizer.encode(text, bos=bos, eos=False)


def text_windows(tokenizer, text: str, mode: str, ctx: int, stride: int) -> tuple[int, list[Window]]:
    """The text's token count in `mode` and its scored windows."""
    if mode == "llamacpp":
        tokens = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)
        bos = tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id >= 0 else None
        return len(tokens), llamacpp_windows(tokens, ctx, bos)
    if mode == "strided":
        tokens = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)
        return len(tokens), strided_windows(tokens, ctx, stride)
    if mode == "rolling":
        tokens = harness_encode(tokenizer, text)
        prefix = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
        return len(tokens), rolling_windows(tokens, prefix, ctx)
    raise Llama2Error(f"unknown perplexity mode {mode!r}; choose one of {', '.join(MODES)}")


def score_text(
    llama, name: str, text: str, mode: str, ctx: int, stride: int, batch_size: int, moments: Moments
) -> TextScore:
    """Score one text; its per-token NLLs also go into `moments`."""
    if not text.strip():
        raise Llama2Error(f"{name}: the text is empty")
    try:
        n_tokens, windows = text_windows(llama.tokenizer, text, mode, ctx, stride)
    except Llama2Error as err:
        raise Llama2Error(f"{name}: {err}") from None
    score = TextScore(name, n_tokens, len(windows), words=count_words(text), bytes=len(text.encode("utf-8")))
    for window, log_probs in window_log_probs(llama, [w for w in windows if w.targets], batch_size):
        nll = target_nll(log_probs, window.targets)
        moments.add(nll)
        score.tokens_scored += nll.numel()
        score.nll_sum += nll.sum().item()
        score.counted += window.counted
        score.counted_nll += nll.mean().item() * window.counted
    return score


def evaluate_perplexity(
    llama,
    texts: Sequence[tuple[str, str]],
    mode: str = "llamacpp",
    ctx: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Perplexity of `llama` over named texts ``[(name, text), ...]`` counted as `mode` counts.

    Args:
        llama: a loaded `llama2.generation.Llama` with max_seq_len >= ctx and
            max_batch_size >= batch_size.
        texts: (name, text) pairs; each text is tokenized and windowed on its own and the
            scored tokens of all are pooled.
        mode: "llamacpp", "strided" or "rolling" (see `METHODS`).
        ctx: tokens a window (llama.cpp's n_ctx, the guide's max_length, the harness's
            max_length).
        stride: strided mode's stride (default ctx // 2).
        batch_size: equal-length windows forwarded together (results do not depend on it).
    """
    if mode not in METHODS:
        raise Llama2Error(f"unknown perplexity mode {mode!r}; choose one of {', '.join(MODES)}")
    if ctx > llama.max_seq_len:
        raise Llama2Error(f"ctx {ctx} exceeds the loaded context of {llama.max_seq_len}")
    if ctx < 2:
        raise Llama2Error(f"ctx must be at least 2, got {ctx}")
    stride = (stride or max(ctx // 2, 1)) if mode == "strided" else None
    moments = Moments()
    start = time.perf_counter()
    scores = [score_text(llama, name, text, mode, ctx, stride, batch_size, moments) for name, text in texts]
    seconds = time.perf_counter() - start
    counted = sum(s.counted for s in scores)
    ppl = math.exp(sum(s.counted_nll for s in scores) / counted)
    result = PerplexityResult(
        mode,
        METHODS[mode],
        ctx,
        stride,
        moments.count,
        counted,
        ppl,
        ppl * moments.mean_and_error()[1],
        seconds,
        [asdict(s) for s in scores],
    )
    if mode == "rolling":
        nll = sum(s.nll_sum for s in scores)
        n_bytes = sum(s.bytes for s in scores)
        result.word_perplexity = math.exp(nll / sum(s.words for s in scores))
        result.byte_perplexity = math.exp(nll / n_bytes)
        result.bits_per_byte = nll / n_bytes / math.log(2)
    return result
