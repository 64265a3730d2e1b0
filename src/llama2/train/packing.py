"""Rows for the model from prepared documents: packing, padding, batches and a resumable order.

`PackedRows` puts examples back to back in full rows, keeping each token's position
within its example and the example's id so attention stays inside it; `PaddedRows` puts
one example per row. `EpochSampler` and `BatchPlan` give the rows of every step as a
pure function of the number of samples read before it, which is all a checkpoint needs
to resume the data exactly, whatever the number of processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Llama2Error
from .data import TokenDataset

IGNORE_INDEX = -100


@dataclass
class Row:
    """One training sequence, numpy arrays of length seq_len.

    Attributes:
        inputs: input ids.
        labels: the id each position should predict, or IGNORE_INDEX.
        positions: RoPE position of each token (restarting at 0 for each packed example).
        document_ids: which packed example each token belongs to.
        length: how many leading positions hold data (the rest is padding).
    """

    inputs: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    document_ids: np.ndarray
    length: int


# (document, first, end): document positions first..end-1 as inputs, first+1..end as labels.
Piece = tuple[int, int, int]


class Rows(ABC):
    """Training rows built from a `TokenDataset`: each row is a list of document pieces."""

    def __init__(self, dataset: TokenDataset, seq_len: int, document_mask: bool = True):
        self.dataset = dataset
        self.seq_len = seq_len
        self.document_mask = document_mask
        # A document of n tokens gives n - 1 (input, label) pairs.
        self.pairs = np.maximum(dataset.lengths - 1, 0)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def pieces(self, i: int) -> list[Piece]:
        """The document pieces of row `i`, in order."""

    def __getitem__(self, i: int) -> Row:
        seq_len = self.seq_len
        inputs = np.zeros(seq_len, dtype=np.int64)
        labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.arange(seq_len, dtype=np.int64)
        document_ids = np.zeros(seq_len, dtype=np.int64)
        cursor = 0
        for k, (doc, first, end) in enumerate(self.pieces(i)):
            tokens, mask = self.dataset.document(doc)
            n = end - first
            span = slice(cursor, cursor + n)
            inputs[span] = tokens[first:end]
            targets = tokens[first + 1 : end + 1].astype(np.int64)
            labels[span] = targets if mask is None else np.where(mask[first + 1 : end + 1] > 0, targets, IGNORE_INDEX)
            if self.document_mask:
                positions[span] = np.arange(n)
                document_ids[span] = k
            cursor += n
        # Padding joins the last example: no real token attends to it, no loss reads it.
        document_ids[cursor:] = document_ids[cursor - 1] if cursor else 0
        return Row(inputs, labels, positions, document_ids, cursor)


class PackedRows(Rows):
    """Examples back to back in full rows.

    With `split_documents` (pretraining) the stream of all documents is cut into rows of
    exactly `seq_len` pairs, a document running on into the next row. Without it (SFT)
    each example stays whole in one row (truncated to `seq_len` when longer), rows
    filled greedily in order.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, split_documents: bool, document_mask: bool = True):
        super().__init__(dataset, seq_len, document_mask)
        self.split_documents = split_documents
        if split_documents:
            self.ends = np.cumsum(self.pairs)  # pair index just past each document
            self.num_rows = int(self.ends[-1]) // seq_len if len(self.ends) else 0
        else:
            self.row_starts = _greedy_rows(np.minimum(self.pairs, seq_len), seq_len)
            self.num_rows = len(self.row_starts) - 1

    def __len__(self) -> int:
        return self.num_rows

    def pieces(self, i: int) -> list[Piece]:
        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        return self._split_pieces(i) if self.split_documents else self._whole_pieces(i)

    def _split_pieces(self, i: int) -> list[Piece]:
        start, stop = i * self.seq_len, (i + 1) * self.seq_len
        doc = int(np.searchsorted(self.ends, start, side="right"))
        pieces = []
        while start < stop:
            doc_start = int(self.ends[doc] - self.pairs[doc])
            end = min(stop, int(self.ends[doc]))
            if end > start:
                pieces.append((doc, start - doc_start, end - doc_start))
            start, doc = end, doc + 1
        return pieces

    def _whole_pieces(self, i: int) -> list[Piece]:
        docs = range(self.row_starts[i], self.row_starts[i + 1])
        return [(d, 0, int(min(self.pairs[d], self.seq_len))) for d in docs if self.pairs[d] > 0]


def _greedy_rows(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Start document of each row when documents fill rows of `capacity` in order, then the end.

    Empty documents join whatever row is open (they add no pieces).
    """
    starts, used = [], capacity  # the first non-empty document opens a row
    for doc, size in enumerate(sizes.tolist()):
        if size and used + size > capacity:
            starts.append(doc)
            used = 0
        used += size
    return np.asarray([*starts, len(sizes)], dtype=np.int64)


class PaddedRows(Rows):
    """One example per row (truncated to `seq_len`), the rest padding that no loss sees."""

    def __init__(self, dataset: TokenDataset, seq_len: int):
        super().__init__(dataset, seq_len, document_mask=False)
        self.docs = np.flatnonzero(self.pairs > 0)

    def __len__(self) -> int:
        return len(self.docs)

    def pieces(self, i: int) -> list[Piece]:
        doc = int(self.docs[i])
        return [(doc, 0, int(min(self.pairs[doc], self.seq_len)))]


def make_rows(dataset: TokenDataset, seq_len: int, layout: str, split_documents: bool, document_mask: bool) -> Rows:
    """`PackedRows` for layout "pack", `PaddedRows` for "pad"."""
    if layout == "pad":
        return PaddedRows(dataset, seq_len)
    return PackedRows(dataset, seq_len, split_documents, document_mask)


# ---------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Rows stacked for the model, cut after the last position holding data.

    `positions` and `document_ids` are None when every row is one plain causal sequence
    (the model then uses its fast causal attention). `num_tokens` counts the positions
    holding data (padding excluded).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    document_ids: torch.Tensor | None
    num_tokens: int

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> Batch:
        move = [
            None if t is None else t.to(device) for t in (self.inputs, self.labels, self.positions, self.document_ids)
        ]
        return Batch(*move, self.num_tokens)


def collate(rows: Sequence[Row]) -> Batch:
    """Stack rows into a `Batch`, dropping trailing columns that are padding in every row."""
    width = max(row.length for row in rows)
    inputs, labels, positions, document_ids = (
        torch.from_numpy(np.stack([getattr(row, name)[:width] for row in rows]))
        for name in ("inputs", "labels", "positions", "document_ids")
    )
    num_tokens = sum(row.length for row in rows)
    single = bool((document_ids == document_ids[:, :1]).all())
    if single and bool((positions == torch.arange(width)).all()):
        return Batch(inputs, labels, None, None, num_tokens)
    return Batch(inputs, labels, positions, None if single else document_ids, num_tokens)


class EpochSampler:
    """A deterministic row order: epoch e is a permutation seeded by (seed, e), or in order.

    Sample k of the run is `row(k)`; nothing else is needed to resume.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True):
        if num_rows <= 0:
            raise Llama2Error("the training data gives no rows: add data or lower --seq-len")
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._order = np.arange(num_rows)

    def row(self, sample: int) -> int:
        epoch, i = divmod(sample, self.num_rows)
        if self.shuffle and epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch = epoch
        return int(self._order[i])


@dataclass(frozen=True)
class BatchPlan:
    """Which samples each process reads in one step.

    A step's global batch is the next `global_batch` samples of the run; process r of W
    takes the r-th of W equal slices and reads it in micro-batches (accumulating
    gradients).
    """

    global_batch: int
    world_size: int
    rank: int
    micro_batch: int

    def __post_init__(self):
        per_rank, remainder = divmod(self.global_batch, self.world_size)
        if remainder or per_rank % self.micro_batch:
            raise Llama2Error(
                f"batch size {self.global_batch} must be a multiple of processes ({self.world_size}) "
                f"x micro-batch size ({self.micro_batch})"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.world_size * self.micro_batch)

    def micro_batches(self, first_sample: int) -> Iterator[range]:
        """Sample numbers of this process's micro-batches in the step starting at `first_sample`."""
        per_rank = self.global_batch // self.world_size
        first = first_sample + self.rank * per_rank
        for k in range(self.accumulation_steps):
            start = first + k * self.micro_batch
            yield range(start, start + self.micro_batch)
