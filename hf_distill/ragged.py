"""Ragged token columns (Arrow list arrays) to padded batches and back, with no per-row Python.

A window of rows is held as one flat value array and its offsets (row ``i`` is
``values[offsets[i]:offsets[i + 1]]``). A batch of rows becomes a padded ``(B, width)`` array in one
vectorised scatter, and per-token results come back to their place in the flat array through the
same index (:class:`BatchLayout`). Used by :mod:`hf_distill.teacher_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .errors import InputError


def flat_lists(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a list column, offsets starting at 0 (a sliced array is handled).

    Raises ``ValueError`` for a column with null rows or one that is not a list column.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise InputError(f"Expected a column of token lists, got Arrow type {column.type}.")
    if column.null_count:
        raise InputError(f"The token column has {column.null_count} missing (null) rows.")
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def batch_bounds(
    sorted_lengths: np.ndarray, max_batch_tokens: int, max_batch_size: int
) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch over rows sorted longest first.

    A batch takes as many rows as fit: at most ``max_batch_size`` and at most ``max_batch_tokens``
    padded tokens (rows times its first, longest, row); a row longer than the budget is a batch of
    its own. The loop runs once per batch, not per row.
    """
    bounds, start, n = [], 0, len(sorted_lengths)
    while start < n:
        longest = max(int(sorted_lengths[start]), 1)
        size = max(1, min(max_batch_size, max_batch_tokens // longest))
        bounds.append((start, min(start + size, n)))
        start = bounds[-1][1]
    return bounds


def longest_first(lengths: np.ndarray) -> np.ndarray:
    """Row positions sorted by length, longest first; ties keep their order (a stable sort)."""
    return np.argsort(-np.asarray(lengths), kind="stable")


@dataclass
class BatchLayout:
    """Where each real token of a batch sits: in the padded ``(B, width)`` batch and in the window.

    ``rows``: the batch's rows (window positions); ``lengths``: theirs; ``token_row`` /
    ``token_col``: each real token's place in the padded batch; ``flat``: its index in the window's
    flat value array (tokens in batch-row order).
    """

    rows: np.ndarray
    lengths: np.ndarray
    width: int
    token_row: np.ndarray
    token_col: np.ndarray
    flat: np.ndarray

    @classmethod
    def of(cls, offsets: np.ndarray, rows: np.ndarray) -> BatchLayout:
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        first = np.cumsum(lengths) - lengths  # each row's first token among the batch's tokens
        token_row = np.repeat(np.arange(len(rows)), lengths)
        token_col = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
        return cls(
            rows=rows,
            lengths=lengths,
            width=int(lengths.max(initial=0)),
            token_row=token_row,
            token_col=token_col,
            flat=np.repeat(starts, lengths) + token_col,
        )

    def pad(self, values: np.ndarray, pad_value: int, width: int | None = None, dtype=np.int64) -> np.ndarray:
        """The batch's rows of ``values`` (a window's flat array) padded on the right to ``width``
        (default: its longest row)."""
        out = np.full((len(self.rows), width or self.width), pad_value, dtype=dtype)
        out[self.token_row, self.token_col] = values[self.flat]
        return out

    def mask(self, width: int | None = None) -> np.ndarray:
        """1 for real tokens, 0 for padding, ``(B, width)``."""
        return (np.arange(width or self.width) < self.lengths[:, None]).astype(np.int64)


def fixed_size_lists(values: np.ndarray) -> pa.Array:
    """An ``(n, w)`` array as ``n`` Arrow fixed-size lists of ``w`` values."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[-1])


def lists_of_fixed_size_lists(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Flat per-token rows ``(tokens, w)`` with row offsets as lists (one per row) of fixed-size lists."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), fixed_size_lists(values))
