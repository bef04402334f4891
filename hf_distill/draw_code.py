"""The RS-KD cache's pooled draws in a code, with the exact head's ids: about 8.8 bits a draw where a ``uint16`` id
takes 16, and about 9.4 bits a head id (the LM default's cache, 29 draws and a head of 3 a token).

A row of an adaptive RS-KD cache (``sample_allocation: adaptive``) holds its tokens' draws one token after
another, ``n_t`` for token ``t`` (``teacher_sample_lengths``). Within a token the order of the draws does not
matter (each weighs ``1 / n_t``), so each token's draws are sorted and coded as a sorted list. A row's code
(``teacher_sample_code``, uint8) starts with a 4-byte header, uint32 little-endian: ``V`` (a bound on the ids)
in its low 30 bits, in its top bit which code follows, and in the next whether the head's ids are in it.

- **Interpolative** (top bit 1; cache format 7). Binary interpolative coding (Moffat and Stuiver, 2000): a token's
  sorted draws ``a_0 <= ... <= a_{n-1}``, all in ``[lo, hi] = [0, V - 1]``, are written as their middle one
  ``a_m`` (``m = n // 2``) in ``[lo, hi]``, then the left half in ``[lo, a_m]`` and the right half in
  ``[a_m, hi]``, recursively. A value among ``r = hi - lo + 1`` takes ``floor(log2 r)`` or one bit more (a
  truncated binary code), so draws that cluster (the likely tokens, drawn again and again) cost few bits, and a
  repeat in a range of one value costs none: 9.8 bits a draw on a 24-draw cache of the LM default's teacher, against
  12.0 for the Rice code and 16 for a uint16 id. The row's tokens are coded together, level by level of the recursion (at
  most 8 levels for ``n_t <= 255``): each level's ``floor(log2 r)``-bit parts, then the extra bits of the values
  that need one.
- **Interpolative with the head** (top bits 1 and 1; cache format 8, what the library writes). The tokens' exact
  heads (``h`` ids each, distinct) go in the code too, and the row's distinct head ids ``D`` (sorted) become its
  dictionary: after the header, ``|D|`` (uint32) and ``h`` (uint8), then in the interpolative code ``D`` (one
  list in ``[0, V - 1]``), each token's head as its ``h`` ascending indices into ``D`` (in ``[0, |D| - 1]``),
  and the draws renumbered with ``D`` first (``D[j] -> j``, every other id after them in order,
  :func:`_to_dictionary`). A tail draw is most often an id that heads another token of the row, so renumbered
  the draws cluster near 0: on a 24-draw cache with a head of 3 the head's ids and the draws take 31.0 bytes a
  token, against 35.5 as uint16 head ids and the format-7 code; on the LM default's (29 draws) 8.8 bits a draw
  against 9.4 in format 7.
- **Rice** (top bit 0; cache format 6, still read). Each sorted draw is stored as its gap ``d`` to the one
  before (to 0 for the first) in a Rice code with parameter ``k_t = max(0, bit_length(V // (n_t + 1)) - 2)``
  (about ``log2(V / n_t) - 1``, from ``n_t`` alone): ``d = q 2**k_t + r``, the unary parts (``q`` ones and a
  zero, token after token), then the remainders ``r`` in ``k_t`` bits.

All pad with zero bits to the byte. All are lossless (:func:`decode_row` gives back each token's head and draws,
sorted), so every property of the draws, unbiasedness first, is the draws'. Every direction is vectorised over
the row (no loop over draws).
"""

from __future__ import annotations

import numpy as np

HEADER_BYTES = 4
HEAD_HEADER_BYTES = 2 * HEADER_BYTES + 1  # format 8: the header, the dictionary's size (uint32), h (uint8)
CODES = ("interpolative", "rice")
_INTERPOLATIVE = 1 << 31  # the header's top bit: the interpolative code
_HEAD = 1 << 30  # the next: the row's exact head is coded too (format 8)


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
    if not 0 < vocab_size < _HEAD or (ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size):
        raise ValueError(f"draws must be ids in 0..{vocab_size - 1} (and the vocabulary below 2**30).")
    return _by_token(ids, lengths)


def _by_token(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The pooled ``ids`` (``lengths[t]`` for token ``t``, token after token) ascending within each token."""
    token = np.repeat(np.arange(lengths.size), lengths)
    return ids[np.lexsort((ids, token))]


def encode_draws(
    ids: np.ndarray,
    lengths: np.ndarray,
    vocab_size: int,
    code: str = "interpolative",
    head: np.ndarray | None = None,
) -> np.ndarray:
    """One row's pooled draws ``ids`` (``sum(lengths)``, token after token) in its code (uint8): ``code`` is
    ``"interpolative"`` (cache format 7; with ``head``, 8) or ``"rice"`` (format 6; the module's docstring has
    each).

    ``lengths``: each token's number of draws ``n_t``; ``vocab_size``: a bound on the ids (the header's ``V``).
    ``head``: each token's exact-head ids ``(L, h)``, distinct and ascending within a token, to code with the
    draws (interpolative only; cache format 8): the row's head ids then serve as the draws' dictionary.
    """
    if code not in CODES:
        raise ValueError(f"code={code!r} must be one of {CODES}.")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    ids = _check_draws(ids, lengths, vocab_size)
    if head is not None:
        if code != "interpolative":
            raise ValueError("Only the interpolative code holds a head: pass code='interpolative' or no head.")
        return _encode_with_head(ids, lengths, vocab_size, np.asarray(head, dtype=np.int64))
    encode = _encode_interpolative if code == "interpolative" else _encode_rice
    header = np.array([vocab_size | (_INTERPOLATIVE if code == "interpolative" else 0)], dtype="<u4")
    return np.concatenate([header.view(np.uint8), np.packbits(encode(ids, lengths, vocab_size))])


def _encode_with_head(ids: np.ndarray, lengths: np.ndarray, vocab_size: int, head: np.ndarray) -> np.ndarray:
    if head.ndim != 2 or head.shape[0] != lengths.size or not 0 < head.shape[1] < 256:
        raise ValueError(f"head must be (tokens, h) with 0 < h < 256, one row per token ({lengths.size}); got "
                         f"{tuple(head.shape)}.")  # fmt: skip
    if head.size and not 0 <= int(head.min()) <= int(head.max()) < vocab_size or (np.diff(head, axis=1) <= 0).any():
        raise ValueError(f"head ids must be in 0..{vocab_size - 1}, distinct and ascending within each token.")
    tokens, h = head.shape
    words = np.unique(head)  # the row's dictionary: every id that heads one of its tokens
    index = np.searchsorted(words, head).reshape(-1)
    remapped = _by_token(_to_dictionary(ids, words), lengths)  # re-sorted within each token
    header = np.array([vocab_size | _INTERPOLATIVE | _HEAD, words.size], dtype="<u4").view(np.uint8)
    bits = [
        _encode_interpolative(words, np.array([words.size]), vocab_size),
        _encode_interpolative(index, np.full(tokens, h), max(words.size, 1)),
        _encode_interpolative(remapped, lengths, vocab_size),
    ]
    return np.concatenate([header, np.array([h], dtype=np.uint8), np.packbits(np.concatenate(bits))])


def _to_dictionary(ids: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Ids renumbered with ``words`` (sorted, distinct) first: ``words[j] -> j``, any other id ``x`` to
    ``|words| + x - #{words below x}``. A bijection of ``[0, V)``, so the code's ranges stay ``[0, V - 1]``."""
    below = np.searchsorted(words, ids)
    hit = (below < words.size) & (words[np.minimum(below, max(words.size - 1, 0))] == ids) if words.size else False
    return np.where(hit, below, words.size + ids - below)


def _from_dictionary(values: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_to_dictionary`: the ``z``-th id not among ``words`` is ``z + #{j: words[j] - j <= z}``."""
    rest = values - words.size
    return np.where(rest < 0, words[np.clip(values, 0, max(words.size - 1, 0))] if words.size else 0,
                    rest + np.searchsorted(words - np.arange(words.size), rest, side="right"))  # fmt: skip


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
    """The draws of one row's code (:func:`encode_draws`, any code, told by its header), token after token,
    each token's ascending (int64, ``sum(lengths)``). A code cut short, too long, or of ids beyond its ``V``
    raises ``ValueError``."""
    return decode_row(code, lengths)[1]


def decode_row(code: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """``(head, draws)`` of one row's code: the head ``(L, h)`` (each token's ids ascending) when the code holds
    one (format 8), else None; the draws as :func:`decode_draws` gives them."""
    code = np.asarray(code, dtype=np.uint8).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    cut = ValueError(
        f"An RS-KD draw code of {code.size} bytes does not hold the {int(lengths.sum())} draws its tokens' counts "
        "give: the row was cut or mixed up with another; recompute the cache rather than editing its rows."
    )
    if code.size < HEADER_BYTES:
        raise cut
    header = int(code[:HEADER_BYTES].view("<u4")[0])
    with_head = header & _INTERPOLATIVE and header & _HEAD
    vocab_size = header & ~(_INTERPOLATIVE | _HEAD) if with_head else header & ~_INTERPOLATIVE
    if vocab_size < 1 and lengths.sum():  # no id fits a vocabulary of none
        raise cut
    if with_head:
        head, ids, end, bits = _decode_with_head(code, lengths, vocab_size, cut)
    else:
        bits = np.unpackbits(code[HEADER_BYTES:])
        head, (ids, end) = None, (_decode_interpolative if header & _INTERPOLATIVE else _decode_rice)(
            bits, lengths, vocab_size, cut)  # fmt: skip
    if not end <= bits.size < end + 8 or bits[end:].any() or (ids.size and int(ids.max()) >= vocab_size):
        raise cut
    return head, ids


def _decode_with_head(code: np.ndarray, lengths: np.ndarray, vocab_size: int, cut: ValueError):
    """Format 8: the row's dictionary (its distinct head ids), each token's head as indices into it, then the
    draws renumbered with the dictionary first (:func:`_to_dictionary`)."""
    if code.size < HEAD_HEADER_BYTES:
        raise cut
    size, h = int(code[HEADER_BYTES:2 * HEADER_BYTES].view("<u4")[0]), int(code[2 * HEADER_BYTES])
    tokens = lengths.size
    if h < 1 or (tokens > 0) != (size > 0) or size > tokens * h or size > vocab_size:
        raise cut
    bits = np.unpackbits(code[HEAD_HEADER_BYTES:])
    words, cursor = _decode_interpolative(bits, np.array([size]), vocab_size, cut)
    if (np.diff(words) <= 0).any():
        raise cut
    index, used = _decode_interpolative(bits[cursor:], np.full(tokens, h), max(size, 1), cut)
    index = index.reshape(tokens, h)
    if (np.diff(index, axis=1) <= 0).any():
        raise cut
    cursor += used
    remapped, used = _decode_interpolative(bits[cursor:], lengths, vocab_size, cut)
    return words[index], _by_token(_from_dictionary(remapped, words), lengths), cursor + used, bits


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
