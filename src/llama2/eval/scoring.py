"""Forwarding scored windows through a `Llama`, and the per-token statistics of the results."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import Llama2Error
from .windows import Window


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal input length, at most `batch_size` a group, in order."""
    group: list[Window] = []
    for window in windows:
        if group and (len(group) == batch_size or len(window.inputs) != len(group[0].inputs)):
            yield group
            group = []
        group.append(window)
    if group:
        yield group


@torch.inference_mode()
def window_log_probs(llama, windows: Sequence[Window], batch_size: int = 1) -> Iterator[tuple[Window, torch.Tensor]]:
    """Yield every window with the float64 log-softmax of its scored positions, [len(targets), vocab].

    Windows are fed from position 0 through the model's cached forward (`Llama.steps.step`,
    the path generation prefills with), equal-length neighbours `batch_size` at a time.
    """
    if batch_size < 1:
        raise Llama2Error(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size > llama.max_batch_size:
        raise Llama2Error(f"batch size {batch_size} exceeds the model's max_batch_size {llama.max_batch_size}")
    for group in _batches(windows, batch_size):
        length = len(group[0].inputs)
        if length > llama.max_seq_len:
            raise Llama2Error(f"a window of {length} tokens exceeds the context of {llama.max_seq_len}")
        inputs = torch.tensor([w.inputs for w in group], dtype=torch.long, device=llama.device)
        logits = llama.steps.step(inputs, 0, all_logits=True)
        for row, window in enumerate(group):
            scored = logits[row, window.offset : window.offset + len(window.targets)]
            yield window, torch.log_softmax(scored.double(), dim=-1)


def loglikelihoods(
    llama, windows: Sequence[Window], batch_size: int = 1, on_window: Callable[[], object] | None = None
) -> list[tuple[float, bool]]:
    """(sum of the targets' log-probs, whether every target is the greedy token) per window, in order.

    `on_window` is called after each window (a progress bar's update).
    """
    results = []
    for window, log_probs in window_log_probs(llama, windows, batch_size):
        greedy = log_probs.argmax(dim=-1).tolist() == list(window.targets)
        results.append((-target_nll(log_probs, window.targets).sum().item(), greedy))
        if on_window is not None:
            on_window()
    return results


def target_nll(log_probs: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihood of each target under its row of `log_probs` (float64)."""
    index = torch.tensor(targets, dtype=torch.long, device=log_probs.device).unsqueeze(1)
    return -log_probs.gather(1, index).squeeze(1)


def mean_and_uncertainty(total: float, total_sq: float, count: int, min_count: int = 2) -> tuple[float, float]:
    """Mean of values and its standard error from their sum and sum of squares, as llama.cpp does.

    The error is sqrt((mean(x^2) - mean(x)^2) / (count - 1)), 0 when that variance is not
    positive or fewer than `min_count` values (llama.cpp's KL-divergence statistics use 11).
    """
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count >= min_count else 0.0


@dataclass
class Moments:
    """Running sum, sum of squares and count of per-token values (float64)."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, values: torch.Tensor) -> None:
        """Accumulate a 1-D tensor of values."""
        values = values.double()
        self.total += values.sum().item()
        self.total_sq += (values * values).sum().item()
        self.count += values.numel()

    def mean_and_error(self, min_count: int = 2) -> tuple[float, float]:
        """The mean and its standard error (`mean_and_uncertainty`)."""
        return mean_and_uncertainty(self.total, self.total_sq, self.count, min_count)
