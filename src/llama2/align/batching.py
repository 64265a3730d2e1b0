"""Padded batches of variable-length sequences whose results do not depend on the padding side.

Every real token gets the position it has in its own sequence (0, 1, ...), and padding
is its own "document" (id 0, real tokens id 1), so no real token attends to a pad token
on either side. `last_index` says where each row's last real token is: the reward is
read there, never at a pad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PADDING_SIDES = ("right", "left")


@dataclass
class PaddedBatch:
    """Sequences padded to one length.

    Attributes:
        tokens: [B, T] ids (pads hold `pad_id`).
        positions: [B, T] RoPE positions, 0 at each row's first real token.
        document_ids: [B, T] 1 on real tokens, 0 on pads (attention stays within each).
        real: [B, T] bool, True on real tokens.
        offsets: [B] index of each row's first real token (0 with right padding).
        lengths: [B] real tokens per row.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor
    real: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor

    @property
    def last_index(self) -> torch.Tensor:
        """[B] index of each row's last real token."""
        return self.offsets + self.lengths - 1

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(
            *(
                t.to(device)
                for t in (self.tokens, self.positions, self.document_ids, self.real, self.offsets, self.lengths)
            )
        )


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = 0, side: str = "right") -> PaddedBatch:
    """Pad `sequences` on `side` ("right" or "left") into a `PaddedBatch`."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    width = max(len(s) for s in sequences)
    rows = len(sequences)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros(rows, width, dtype=torch.long)
    real = torch.zeros(rows, width, dtype=torch.bool)
    offsets = torch.zeros(rows, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if side == "left" else 0
        span = slice(start, start + len(sequence))
        tokens[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        positions[row, span] = torch.arange(len(sequence))
        real[row, span] = True
        offsets[row] = start
    return PaddedBatch(tokens, positions, real.long(), real, offsets, lengths)


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, index[b]] for each row b: [B, T, ...] and [B] -> [B, ...]."""
    return values[torch.arange(values.shape[0], device=values.device), index]
