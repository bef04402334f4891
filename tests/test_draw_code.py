"""The Rice code of an adaptive RS-KD cache's pooled draws (hf_distill.draw_code)."""

import numpy as np
import pytest

from hf_distill.draw_code import HEADER_BYTES, decode_draws, encode_draws, rice_parameters


def _sorted_by_token(ids, lengths):
    token = np.repeat(np.arange(len(lengths)), lengths)
    return ids[np.lexsort((ids, token))]


def test_the_code_gives_back_each_tokens_draws_sorted():
    """Random rows (tokens without draws, repeated ids, ids at both ends of the vocabulary, vocabularies from 2 to
    over 2**16): decoding gives each token's draws back, ascending within the token, and none of another's."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        lengths = rng.integers(0, 40, size=int(rng.integers(0, 30)))
        vocab_size = int(rng.choice([2, 7, 1000, 49_152, 151_936]))
        ids = rng.integers(0, vocab_size, size=int(lengths.sum()))
        if ids.size:
            ids[rng.integers(0, ids.size, size=3)] = [0, vocab_size - 1, ids[0]]
        code = encode_draws(ids, lengths, vocab_size)
        assert code.dtype == np.uint8 and int(code[:HEADER_BYTES].view("<u4")[0]) == vocab_size
        np.testing.assert_array_equal(decode_draws(code, lengths), _sorted_by_token(ids, lengths))
    # the same multiset of draws in another order within a token is the same code; across tokens it is not
    ids, lengths = np.array([5, 3, 9, 1]), np.array([3, 1])
    assert encode_draws(ids, lengths, 10).tolist() == encode_draws(np.array([9, 5, 3, 1]), lengths, 10).tolist()
    assert encode_draws(ids, lengths, 10).tolist() != encode_draws(np.array([1, 3, 9, 5]), lengths, 10).tolist()


def test_draws_spread_over_the_vocabulary_take_about_log2_v_over_n_bits_not_16():
    """n draws a token spread over V = 49,152 (uniform: the hardest case for the gaps) cost about log2(V / n) + 2
    bits each with the parameter chosen from n alone; the uint16 ids they replace take 16."""
    rng = np.random.default_rng(1)
    vocab_size = 49_152
    for n in (4, 14, 19, 64):
        lengths = np.full(256, n)
        ids = rng.integers(0, vocab_size, size=256 * n)
        bits = 8 * (encode_draws(ids, lengths, vocab_size).size - HEADER_BYTES) / ids.size
        assert np.log2(vocab_size / n) < bits < np.log2(vocab_size / n) + 2.6 and bits < 16, (n, bits)
    assert rice_parameters(np.array([0, 1, 14, 254, 10**6]), vocab_size).tolist() == [14, 13, 10, 6, 0]


def test_a_cut_garbled_or_mismatched_code_is_refused_in_one_line():
    rng = np.random.default_rng(2)
    lengths = np.array([3, 5, 1, 7])
    code = encode_draws(rng.integers(0, 1000, size=16), lengths, 1000)
    message = r"^An RS-KD draw code of \d+ bytes does not hold the \d+ draws its tokens' counts give: .*recompute"
    for bad, counts in [
        (code[:-2], lengths),  # cut
        (code[:2], lengths),  # no header
        (np.concatenate([code, [0, 0]]).astype(np.uint8), lengths),  # longer than its draws
        (code, np.array([3, 5, 1, 9])),  # another row's counts
    ]:
        with pytest.raises(ValueError, match=message):
            decode_draws(bad, counts)
    garbled = code.copy()
    garbled[:HEADER_BYTES] = np.array([4], dtype="<u4").view(np.uint8)  # a vocabulary the ids do not fit
    with pytest.raises(ValueError, match=message):
        decode_draws(garbled, lengths)
    with pytest.raises(ValueError, match=r"^16 draws but the tokens' counts sum to 15"):
        encode_draws(np.zeros(16, dtype=np.int64), np.array([15]), 1000)
    with pytest.raises(ValueError, match=r"^draws must be ids in 0\.\.999"):
        encode_draws(np.array([1000]), np.array([1]), 1000)
