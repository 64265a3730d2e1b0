"""How a token stream is cut into independently scored windows, the way each tool does it.

Every window is one forward pass from position 0 on a fresh context; the logits at
positions ``offset .. offset + len(targets) - 1`` score ``targets`` (next-token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import Llama2Error


@dataclass(frozen=True)
class Window:
    """One forward pass and the tokens it scores.

    Attributes:
        inputs: token ids fed at positions 0 .. len(inputs) - 1.
        targets: the scored token ids; ``targets[i]`` is predicted by the logits at
            position ``offset + i``.
        offset: the first position whose logits are scored.
        weight: how many tokens the reference loop counts this window's mean loss for
            (None: ``len(targets)``, a plain per-token average). Only Hugging Face's
            strided guide differs (see `strided_windows`).
    """

    inputs: list[int]
    targets: list[int]
    offset: int
    weight: int | None = None

    @property
    def counted(self) -> int:
        """Tokens the mode's average counts this window for."""
        return len(self.targets) if self.weight is None else self.weight


def llamacpp_windows(tokens: Sequence[int], n_ctx: int, bos_id: int | None) -> list[Window]:
    """llama.cpp's `llama-perplexity` chunks (tools/perplexity/perplexity.cpp, `perplexity`).

    `tokens` is the whole text tokenized once, with BOS prepended when the vocabulary adds
    BOS. It is cut into ``len(tokens) // n_ctx`` non-overlapping chunks of `n_ctx` tokens
    (the tail is dropped); the first token of each chunk is replaced by BOS when `bos_id`
    is given (the vocabulary adds BOS). With ``first = n_ctx // 2``, the logits at positions
    first .. n_ctx - 2 score tokens first + 1 .. n_ctx - 1: ``n_ctx - first - 1`` tokens a
    chunk. llama.cpp refuses texts of fewer than ``2 * n_ctx`` tokens, and so does this.
    """
    if n_ctx < 4:
        raise Llama2Error(f"--ctx must be at least 4 for llama.cpp's chunks, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise Llama2Error(
            f"the text has {len(tokens)} tokens but llama.cpp's method needs at least 2 x ctx = {2 * n_ctx}; "
            f"give a longer text or a smaller --ctx"
        )
    first = n_ctx // 2
    windows = []
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        chunk = list(tokens[start : start + n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        windows.append(Window(chunk, chunk[first + 1 :], first))
    return windows


def strided_windows(tokens: Sequence[int], max_length: int, stride: int) -> list[Window]:
    """Hugging Face's perplexity guide loop (transformers docs, "Perplexity of fixed-length models").

    For ``begin in range(0, len(tokens), stride)``: ``end = min(begin + max_length, n)``,
    ``trg_len = end - prev_end``; the window feeds tokens[begin:end] and only its last
    `trg_len` labels count (the first label of a window is never predicted, so the first
    window scores trg_len - 1 tokens). The guide's current version averages as
    ``sum(window_mean_loss * (trg_len - 1)) / sum(trg_len - 1)`` (it subtracts the label
    shift once per window), which `Window.weight` carries; the loop stops at the window
    that reaches the end.
    """
    if len(tokens) < 2:
        raise Llama2Error(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    if not 1 <= stride <= max_length:
        raise Llama2Error(f"--stride must be between 1 and ctx ({max_length}), got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        trg_len = end - prev_end
        inputs = list(tokens[begin:end])
        scored_from = max(end - trg_len, begin + 1)  # positions whose labels are kept and predictable
        windows.append(Window(inputs, inputs[scored_from - begin :], scored_from - begin - 1, weight=trg_len - 1))
        prev_end = end
        if end == len(tokens):
            break
    return windows


def rolling_token_windows(token_list: Sequence[int], prefix_token: int, max_seq_len: int, context_len: int = 1):
    """lm-evaluation-harness's `get_rolling_token_windows` (lm_eval/utils.py): (context, continuation) pairs.

    The first window predicts min(max_seq_len, n) tokens after the prefix token; every
    later one predicts up to ``max_seq_len - context_len + 1`` new tokens with the tokens
    before them as context, each pair spanning at most max_seq_len + 1 tokens.
    """
    if not 1 <= context_len <= max_seq_len:
        raise Llama2Error(f"context_len must be in [1, {max_seq_len}], got {context_len}")
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token, *token_list[: first_seq_len - 1]], list(token_list[:first_seq_len])
    predicted = first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            list(token_list[window_end - max_seq_len - 1 : window_end - 1]),
            list(token_list[window_end - window_pred_len : window_end]),
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `make_disjoint_window`: the context stops where the continuation starts."""
    context, continuation = pair
    return context[: len(context) - (len(continuation) - 1)], continuation


def loglikelihood_window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Window:
    """The forward pass the harness's `HFLM._loglikelihood_tokens` makes for one request.

    It feeds ``(context + continuation)[-(max_length + 1):][:-1]`` and scores the
    continuation with the logits of the last ``len(continuation)`` positions.
    """
    inputs = [*context, *continuation][-(max_length + 1) :][:-1]
    return Window(inputs, list(continuation), len(inputs) - len(continuation))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Window]:
    """lm-evaluation-harness's `loglikelihood_rolling` on one document (HFLM, context_len 1).

    `tokens` is the document as HFLM encodes it; `prefix_token` is the model's BOS (EOS when
    it has none). Every document token is scored exactly once.
    """
    if not tokens:
        raise Llama2Error("the document has no tokens")
    pairs = map(make_disjoint_window, rolling_token_windows(tokens, prefix_token, max_length, context_len=1))
    return [loglikelihood_window(context, continuation, max_length) for context, continuation in pairs]
