"""The RS-KD cache's pooled draws in a code: about 10.3 bits a draw where a ``uint16`` id takes 16.

A row of an adaptive RS-KD cache (``sample_allocation: adaptive``) holds its tokens' draws one token after
another, ``n_t`` for token ``t`` (``teacher_sample_lengths``). Within a token the order of the draws does not
matter (each weighs ``1 / n_t``), so each token's draws are sorted and coded as a sorted list. A row's code
(``teacher_sample_code``, uint8) starts with a 4-byte header, uint32 little-endian: ``V`` (a bound on the ids)
in its low 31 bits, and in its top bit which code follows.

- **Interpolative** (top bit 1; cache format 7, what the library writes). Binary interpolative coding (Moffat and
  Stuiver, 2000): a token's sorted draws ``a_0 <= ... <= a_{n-1}``, all in ``[lo, hi] = [0, V - 1]``, are
  written as their middle one ``a_m`` (``m = n // 2``) in ``[lo, hi]``, then the left half in ``[lo, a_m]`` and
  the right half in ``[a_m, hi]``, recursively. A value among ``r = hi - lo + 1`` takes ``floor(log2 r)`` or
  one bit more (a truncated binary code), so draws that cluster (the likely tokens, drawn again and again) cost
  few bits, and a repeat in a range of one value costs none: 10.3 bits a draw on the LM default's cache, against
  12.0 for the Rice code and 16 for a uint16 id. The row's tokens are coded together, level by level of the
  recursion (at most 8 levels for ``n_t <= 255``): each level's ``floor(log2 r)``-bit parts, then the extra bits
  of the values that need one.
- **Rice** (top bit 0; cache format 6, still read). Each sorted draw is stored as its gap ``d`` to the one
  before (to 0 for the first) in a Rice code with parameter ``k_t = max(0, bit_length(V // (n_t + 1)) - 2)``
  (about ``log2(V / n_t) - 1``, from ``n_t`` alone): ``d = q 2**k_t + r``, the unary parts (``q`` ones and a
  zero, token after token), then the remainders ``r`` in ``k_t`` bits.

Both pad with zero bits to the byte. Both are lossless (:func:`decode_draws` gives back each token's draws,
sorted), so every property of the draws, unbiasedness first, is the draws'. Both directions are vectorised over
the row (no loop over draws).
"""

from __future__ import annotations

import numpy as np

HEADER_BYTES = 4
CODES = ("interpolative", "rice")
_INTERPOLATIVE = 1 << 31  # the header's top bit: the interpolative code


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


def _write(widths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` in ``widths`` bits each, one after another, most significant bit first: the bits (uint8 0/1)."""
    bits = np.zeros(int(widths.sum()), dtype=np.uint8)
    if values.size:
        index, shift, real = _bit_positions(widths, np.cumsum(widths) - widths)
        bits[index[real]] = ((values[:, None] >> shift) & 1)[real]
    return bits


def _read(bits: np.ndarray, starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The values written in ``widths`` bits from bit ``starts`` of ``bits`` (int64, most significant first)."""
    index, shift, real = _bit_positions(widths, starts)
    return ((bits[np.where(real, index, 0)].astype(np.int64) << shift) * real).sum(-1)


def _truncated_binary(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``count`` possible values: ``k = floor(log2 count)`` and ``u = 2**(k + 1) - count``. A value ``x < u``
    is written in ``k`` bits; any other as ``x + u`` in ``k + 1`` bits (its first ``k`` bits read as ``>= u``)."""
    k = np.frexp(count.astype(np.float64))[1].astype(np.int64) - 1  # exact below 2**53
    return k, (np.int64(1) << (k + 1)) - count


def _halves(start, n, lo, hi, middle):
    """The two halves of each interpolative segment (``start``, ``n`` draws in ``[lo, hi]``, its middle draw
    ``middle``), left then right, segment after segment; empty halves dropped."""
    half = n // 2
    start, n = _interleave(start, start + half + 1), _interleave(half, n - half - 1)
    lo, hi = _interleave(lo, middle), _interleave(middle, hi)
    kept = n > 0
    return start[kept], n[kept], lo[kept], hi[kept]


def _interleave(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left[0], right[0], left[1], right[1], ...``"""
    out = np.empty(2 * left.size, dtype=np.int64)
    out[0::2], out[1::2] = left, right
    return out


def _roots(lengths: np.ndarray, vocab_size: int):
    """Each token with draws as one interpolative segment: its first draw, its count, ``[0, V - 1]``."""
    kept = lengths > 0
    n = lengths[kept]
    return (np.cumsum(lengths) - lengths)[kept], n, np.zeros_like(n), np.full_like(n, vocab_size - 1)


def _check_draws(ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """The draws sorted within each token; a count or id that does not fit is refused in one line."""
    if int(lengths.sum()) != ids.size or (lengths < 0).any():
        raise ValueError(f"{ids.size} draws but the tokens' counts sum to {int(lengths.sum())}.")
    if not 0 < vocab_size < _INTERPOLATIVE or (ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size):
        raise ValueError(f"draws must be ids in 0..{vocab_size - 1} (and the vocabulary below 2**31).")
    token = np.repeat(np.arange(lengths.size), lengths)
    return ids[np.lexsort((ids, token))]  # ascending within each token


def encode_draws(ids: np.ndarray, lengths: np.ndarray, vocab_size: int, code: str = "interpolative") -> np.ndarray:
    """One row's pooled draws ``ids`` (``sum(lengths)``, token after token) in its code (uint8): ``code`` is
    ``"interpolative"`` (cache format 7) or ``"rice"`` (format 6; the module's docstring has both).

    ``lengths``: each token's number of draws ``n_t``; ``vocab_size``: a bound on the ids (the header's ``V``).
    """
    if code not in CODES:
        raise ValueError(f"code={code!r} must be one of {CODES}.")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    ids = _check_draws(ids, lengths, vocab_size)
    encode = _encode_interpolative if code == "interpolative" else _encode_rice
    header = np.array([vocab_size | (_INTERPOLATIVE if code == "interpolative" else 0)], dtype="<u4")
    return np.concatenate([header.view(np.uint8), np.packbits(encode(ids, lengths, vocab_size))])


def _encode_interpolative(ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    values, widths = [], []
    start, n, lo, hi = _roots(lengths, vocab_size)
    while n.size:  # one level of the recursion, every segment of the row at once
        middle = ids[start + n // 2]
        k, u = _truncated_binary(hi - lo + 1)
        x = middle - lo
        extra = x >= u
        values += [np.where(extra, (x + u) >> 1, x), ((x + u) & 1)[extra]]
        widths += [k, np.ones(int(extra.sum()), dtype=np.int64)]
        start, n, lo, hi = _halves(start, n, lo, hi, middle)
    empty = np.zeros(0, dtype=np.int64)
    return _write(np.concatenate(widths or [empty]), np.concatenate(values or [empty]))


def _encode_rice(ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    starts = np.cumsum(lengths) - lengths
    previous = np.concatenate([[0], ids[:-1]]) if ids.size else ids
    previous[starts[lengths > 0]] = 0
    gaps = ids - previous
    k = np.repeat(rice_parameters(lengths, vocab_size), lengths)
    quotients, remainders = gaps >> k, gaps & ((1 << k) - 1)
    unary = np.ones(int((quotients + 1).sum()), dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 0
    return np.concatenate([unary, _write(k, remainders)])


def decode_draws(code: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The draws of one row's code (:func:`encode_draws`, either code, told by its header), token after token,
    each token's ascending (int64, ``sum(lengths)``). A code cut short, too long, or of ids beyond its ``V``
    raises ``ValueError``."""
    code = np.asarray(code, dtype=np.uint8).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    cut = ValueError(
        f"An RS-KD draw code of {code.size} bytes does not hold the {int(lengths.sum())} draws its tokens' counts "
        "give: the row was cut or mixed up with another; recompute the cache rather than editing its rows."
    )
    if code.size < HEADER_BYTES:
        raise cut
    header = int(code[:HEADER_BYTES].view("<u4")[0])
    decode = _decode_interpolative if header & _INTERPOLATIVE else _decode_rice
    vocab_size = header & ~_INTERPOLATIVE
    if vocab_size < 1 and lengths.sum():  # no id fits a vocabulary of none
        raise cut
    bits = np.unpackbits(code[HEADER_BYTES:])
    ids, end = decode(bits, lengths, vocab_size, cut)
    if not end <= bits.size < end + 8 or bits[end:].any() or (ids.size and int(ids.max()) >= vocab_size):
        raise cut
    return ids


def _decode_interpolative(bits: np.ndarray, lengths: np.ndarray, vocab_size: int, cut: ValueError):
    ids = np.zeros(int(lengths.sum()), dtype=np.int64)
    cursor = 0
    start, n, lo, hi = _roots(lengths, vocab_size)
    while n.size:
        k, u = _truncated_binary(hi - lo + 1)
        end = cursor + int(k.sum())
        if end > bits.size:
            raise cut
        y = _read(bits, cursor + np.cumsum(k) - k, k)
        extra = y >= u
        cursor = end + int(extra.sum())
        if cursor > bits.size:
            raise cut
        last = np.zeros_like(y)
        last[extra] = bits[end:cursor]
        middle = lo + np.where(extra, 2 * y + last - u, y)
        if (middle > hi).any():
            raise cut
        ids[start + n // 2] = middle
        start, n, lo, hi = _halves(start, n, lo, hi, middle)
    return ids, cursor


def _decode_rice(bits: np.ndarray, lengths: np.ndarray, vocab_size: int, cut: ValueError):
    total = int(lengths.sum())
    zeros = np.flatnonzero(bits == 0)[:total]
    if zeros.size < total:
        raise cut
    unary = int(zeros[-1]) + 1 if total else 0
    k = np.repeat(rice_parameters(lengths, vocab_size), lengths)
    end = unary + int(k.sum())
    if end > bits.size:
        raise cut
    gaps = ((np.diff(zeros, prepend=-1) - 1) << k) + _read(bits, unary + np.cumsum(k) - k, k)
    running = np.cumsum(gaps)
    return running - np.repeat(np.concatenate([[0], running])[np.cumsum(lengths) - lengths], lengths), end
