"""The RS-KD cache's pooled draws in a Rice code: about 12 bits a draw where a ``uint16`` id takes 16.

A row of an adaptive RS-KD cache (``sample_allocation: adaptive``) holds its tokens' draws one token after
another, ``n_t`` for token ``t`` (``teacher_sample_lengths``). Within a token the order of the draws does not
matter (each weighs ``1 / n_t``), so they are sorted and each is stored as its gap ``d`` to the one before (to
0 for the first). For ``n_t`` draws over a vocabulary of ``V`` the gaps are about ``V / n_t``, which a Rice
code with parameter ``k_t = max(0, bit_length(V // (n_t + 1)) - 2)`` (about ``log2(V / n_t) - 1``, from
``n_t`` alone, so nothing more is stored) writes as ``d = q 2**k_t + r``: ``q`` ones and a zero, then ``r`` in
``k_t`` bits. A row's code (``teacher_sample_code``, uint8):

- 4 bytes: ``V``, uint32 little-endian;
- the unary part: each draw's ``q`` ones and a zero, token after token;
- the remainder part: each draw's ``r`` in ``k_t`` bits, most significant first;
- zero bits to the byte.

The code is lossless (:func:`decode_draws` gives back each token's draws, sorted), so every property of the
draws, unbiasedness first, is the draws'. Both directions are vectorised over the row (no loop over draws).
"""

from __future__ import annotations

import numpy as np

HEADER_BYTES = 4


def rice_parameters(lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each token's Rice parameter ``k_t = max(0, bit_length(V // (n_t + 1)) - 2)`` (int64, one per token)."""
    ratio = vocab_size // (np.asarray(lengths, dtype=np.int64) + 1)
    bit_length = np.frexp(np.maximum(ratio, 1).astype(np.float64))[1].astype(np.int64)  # exact below 2**53
    return np.maximum(bit_length - 2, 0)


def _bit_positions(widths: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For values written in ``widths`` bits from bit ``starts``: each bit's index, its shift, and which are real
    (``(D, max width)`` each)."""
    place = np.arange(int(widths.max()) if widths.size else 0)
    real = place[None, :] < widths[:, None]
    return starts[:, None] + place[None, :], np.where(real, widths[:, None] - 1 - place[None, :], 0), real


def encode_draws(ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """One row's pooled draws ``ids`` (``sum(lengths)``, token after token) as its Rice code (uint8).

    ``lengths``: each token's number of draws ``n_t``; ``vocab_size``: a bound on the ids (the header's ``V``).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if int(lengths.sum()) != ids.size or (lengths < 0).any():
        raise ValueError(f"{ids.size} draws but the tokens' counts sum to {int(lengths.sum())}.")
    if not 0 < vocab_size < 2**32 or (ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size):
        raise ValueError(f"draws must be ids in 0..{vocab_size - 1} (and the vocabulary below 2**32).")
    token = np.repeat(np.arange(lengths.size), lengths)
    ids = ids[np.lexsort((ids, token))]  # ascending within each token
    starts = np.cumsum(lengths) - lengths
    previous = np.concatenate([[0], ids[:-1]]) if ids.size else ids
    previous[starts[lengths > 0]] = 0
    gaps = ids - previous
    k = np.repeat(rice_parameters(lengths, vocab_size), lengths)
    quotients, remainders = gaps >> k, gaps & ((1 << k) - 1)
    unary = int((quotients + 1).sum())
    bits = np.ones(unary + int(k.sum()), dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0
    index, shift, real = _bit_positions(k, unary + np.cumsum(k) - k)
    bits[index[real]] = ((remainders[:, None] >> shift) & 1)[real]
    header = np.array([vocab_size], dtype="<u4").view(np.uint8)
    return np.concatenate([header, np.packbits(bits)])


def decode_draws(code: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The draws of one row's Rice code (:func:`encode_draws`), token after token, each token's ascending
    (int64, ``sum(lengths)``). A code cut short, too long, or of ids beyond its ``V`` raises ``ValueError``."""
    code = np.asarray(code, dtype=np.uint8).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    cut = (
        f"An RS-KD draw code of {code.size} bytes does not hold the {int(lengths.sum())} draws its tokens' counts "
        "give: the row was cut or mixed up with another; recompute the cache rather than editing its rows."
    )
    if code.size < HEADER_BYTES:
        raise ValueError(cut)
    vocab_size = int(code[:HEADER_BYTES].view("<u4")[0])
    bits = np.unpackbits(code[HEADER_BYTES:])
    total = int(lengths.sum())
    zeros = np.flatnonzero(bits == 0)[:total]
    if zeros.size < total:
        raise ValueError(cut)
    unary = int(zeros[-1]) + 1 if total else 0
    k = np.repeat(rice_parameters(lengths, vocab_size), lengths)
    end = unary + int(k.sum())
    if not end <= bits.size < end + 8:
        raise ValueError(cut)
    index, shift, real = _bit_positions(k, unary + np.cumsum(k) - k)
    remainders = ((bits[np.where(real, index, 0)].astype(np.int64) << shift) * real).sum(-1)
    gaps = ((np.diff(zeros, prepend=-1) - 1) << k) + remainders
    running = np.cumsum(gaps)
    ids = running - np.repeat(np.concatenate([[0], running])[np.cumsum(lengths) - lengths], lengths)
    if ids.size and int(ids.max()) >= vocab_size:
        raise ValueError(cut)
    return ids
