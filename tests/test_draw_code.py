"""The codes of an adaptive RS-KD cache's pooled draws (hf_distill.draw_code): interpolative with the head's ids
(format 8, written), interpolative alone (format 7, read) and Rice (format 6, read)."""

import numpy as np
import pytest

from hf_distill.draw_code import CODES, HEADER_BYTES, decode_draws, decode_row, encode_draws, rice_parameters


def _sorted_by_token(ids, lengths):
    token = np.repeat(np.arange(len(lengths)), lengths)
    return ids[np.lexsort((ids, token))]


@pytest.mark.parametrize("kind", CODES)
def test_the_code_gives_back_each_tokens_draws_sorted(kind):
    """Random rows (tokens without draws, repeated ids, ids at both ends of the vocabulary, vocabularies from 1 to
    over 2**16, up to 255 draws a token): decoding gives each token's draws back, ascending within the token, and
    none of another's; the header holds V and, in its top bit, which code it is."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        lengths = rng.integers(0, int(rng.choice([4, 40, 256])), size=int(rng.integers(0, 30)))
        vocab_size = int(rng.choice([1, 2, 7, 1000, 49_152, 151_936]))
        ids = rng.integers(0, vocab_size, size=int(lengths.sum()))
        if ids.size:
            ids[rng.integers(0, ids.size, size=3)] = [0, vocab_size - 1, ids[0]]
        code = encode_draws(ids, lengths, vocab_size, kind)
        header = int(code[:HEADER_BYTES].view("<u4")[0])
        assert code.dtype == np.uint8 and header == vocab_size | (2**31 if kind == "interpolative" else 0)
        np.testing.assert_array_equal(decode_draws(code, lengths), _sorted_by_token(ids, lengths))
    # the same multiset of draws in another order within a token is the same code; across tokens it is not
    ids, lengths = np.array([5, 3, 9, 1]), np.array([3, 1])
    same = encode_draws(np.array([9, 5, 3, 1]), lengths, 10, kind)
    assert encode_draws(ids, lengths, 10, kind).tolist() == same.tolist()
    assert encode_draws(ids, lengths, 10, kind).tolist() != encode_draws(np.array([1, 3, 9, 5]), lengths, 10, kind).tolist()
    with pytest.raises(ValueError, match=r"^code='gzip' must be one of"):
        encode_draws(ids, lengths, 10, "gzip")


def test_the_interpolative_code_takes_fewer_bits_than_the_rice_code_where_draws_cluster():
    """Draws from a peaked distribution (a Zipf-like teacher: the likely tokens drawn again and again) cost fewer
    bits a draw in the interpolative code than in the Rice code, whose gaps ignore clustering; a token whose
    draws are all one id costs the interpolative code under 3 bits a draw (a half whose range is that one id costs
    nothing)."""
    rng = np.random.default_rng(3)
    vocab_size = 49_152
    probs = 1.0 / np.arange(1, vocab_size + 1) ** 1.2
    probs /= probs.sum()
    lengths = np.full(256, 19)
    ids = rng.choice(vocab_size, size=lengths.sum(), p=probs)
    size = {kind: encode_draws(ids, lengths, vocab_size, kind).size - HEADER_BYTES for kind in CODES}
    assert size["interpolative"] < 0.9 * size["rice"], size
    repeated = encode_draws(np.full(64, 12_345), np.array([64]), vocab_size).size - HEADER_BYTES
    assert 8 * repeated < 3 * 64, repeated
    assert decode_draws(encode_draws(np.full(64, 7), np.array([64]), 10), np.array([64])).tolist() == [7] * 64


@pytest.mark.parametrize("kind", CODES)
def test_draws_spread_over_the_vocabulary_take_about_log2_v_over_n_bits_not_16(kind):
    """n draws a token spread over V = 49,152 (uniform: the hardest case for either code) cost about
    log2(V / n) + 2 bits each, the Rice parameter chosen from n alone; the uint16 ids they replace take 16."""
    rng = np.random.default_rng(1)
    vocab_size = 49_152
    for n in (4, 14, 19, 64):
        lengths = np.full(256, n)
        ids = rng.integers(0, vocab_size, size=256 * n)
        bits = 8 * (encode_draws(ids, lengths, vocab_size, kind).size - HEADER_BYTES) / ids.size
        assert np.log2(vocab_size / n) < bits < np.log2(vocab_size / n) + 2.6 and bits < 16, (n, bits)
    assert rice_parameters(np.array([0, 1, 14, 254, 10**6]), vocab_size).tolist() == [14, 13, 10, 6, 0]


@pytest.mark.parametrize("kind", CODES)
def test_a_cut_garbled_or_mismatched_code_is_refused_in_one_line(kind):
    rng = np.random.default_rng(2)
    lengths = np.array([3, 5, 1, 7])
    code = encode_draws(rng.integers(0, 1000, size=16), lengths, 1000, kind)
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
    flag = 2**31 if kind == "interpolative" else 0
    garbled[:HEADER_BYTES] = np.array([4 | flag], dtype="<u4").view(np.uint8)  # a vocabulary the ids do not fit
    with pytest.raises(ValueError, match=message):
        decode_draws(garbled, lengths)
    with pytest.raises(ValueError, match=r"^16 draws but the tokens' counts sum to 15"):
        encode_draws(np.zeros(16, dtype=np.int64), np.array([15]), 1000)
    with pytest.raises(ValueError, match=r"^draws must be ids in 0\.\.999"):
        encode_draws(np.array([1000]), np.array([1]), 1000)


def _heads(rng, tokens, h, vocab_size, probs=None):
    """Each token's ``h`` distinct head ids, ascending (from ``probs`` when given)."""
    rows = [np.sort(rng.choice(vocab_size, size=h, replace=False, p=probs)) for _ in range(tokens)]
    return np.array(rows, dtype=np.int64).reshape(tokens, h)


def test_the_code_with_the_head_gives_back_both_and_a_code_without_gives_none():
    """Random rows (tokens without draws, draws equal to head ids and to ids no head holds, ids at both ends of the
    vocabulary, heads of 1 to 8): the format-8 code gives back each token's head ids and its draws, ascending,
    and :func:`decode_draws` the same draws; a code without a head gives None for it. The header's second bit says
    a head is held."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        tokens, h = int(rng.integers(0, 30)), int(rng.integers(1, 9))
        vocab_size = int(rng.choice([8, 9, 1000, 49_152, 151_936]))
        lengths = rng.integers(0, int(rng.choice([4, 40])), size=tokens)
        head = _heads(rng, tokens, h, vocab_size)
        ids = rng.integers(0, vocab_size, size=int(lengths.sum()))
        if ids.size and tokens:  # some draws are ids of the row's heads, some the vocabulary's ends
            ids[rng.integers(0, ids.size, size=ids.size // 2)] = rng.choice(head.reshape(-1), size=ids.size // 2)
            ids[rng.integers(0, ids.size, size=2)] = [0, vocab_size - 1]
        code = encode_draws(ids, lengths, vocab_size, head=head)
        assert int(code[:HEADER_BYTES].view("<u4")[0]) == vocab_size | 2**31 | 2**30
        got_head, draws = decode_row(code, lengths)
        np.testing.assert_array_equal(got_head, head)
        np.testing.assert_array_equal(draws, _sorted_by_token(ids, lengths))
        np.testing.assert_array_equal(decode_draws(code, lengths), draws)
        assert decode_row(encode_draws(ids, lengths, vocab_size), lengths)[0] is None


def test_the_head_and_draws_take_fewer_bytes_coded_together_than_apart():
    """A Zipf-like teacher's rows (256 tokens, a head of 3 from the likely ids, 24 draws from the same
    distribution): the code with the head, whose distinct ids become the draws' dictionary, takes at least 10%
    fewer bytes than the uint16 head ids and the draws' format-7 code."""
    rng = np.random.default_rng(5)
    vocab_size = 49_152
    probs = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    probs = probs[rng.permutation(vocab_size)] / probs.sum()  # the likely ids anywhere in the vocabulary
    lengths = np.full(256, 24)
    head = _heads(rng, 256, 3, vocab_size, probs)
    ids = rng.choice(vocab_size, size=lengths.sum(), p=probs)
    together = encode_draws(ids, lengths, vocab_size, head=head).size
    apart = 2 * head.size + encode_draws(ids, lengths, vocab_size).size
    assert together < 0.9 * apart, (together, apart)


def test_a_bad_head_is_refused_and_a_cut_or_garbled_head_code_too():
    rng = np.random.default_rng(6)
    lengths = np.array([3, 5, 1, 7])
    head = _heads(rng, 4, 2, 1000)
    code = encode_draws(rng.integers(0, 1000, size=16), lengths, 1000, head=head)
    message = r"^An RS-KD draw code of \d+ bytes does not hold the \d+ draws its tokens' counts give: .*recompute"
    garbled_size, garbled_h = code.copy(), code.copy()
    garbled_size[HEADER_BYTES:2 * HEADER_BYTES] = np.array([4 * 2 + 1], dtype="<u4").view(np.uint8)  # > L h ids
    garbled_h[2 * HEADER_BYTES] = 0
    for bad, counts in [(code[:-2], lengths), (code[:6], lengths), (code, np.array([3, 5, 1, 9])),
                        (code, np.array([3, 5, 1, 7, 0])), (garbled_size, lengths), (garbled_h, lengths)]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            decode_row(bad, counts)
    for bad_head, why in [(head[:, ::-1], "distinct and ascending"), (np.array([[1, 1]] * 4), "distinct and ascending"),
                          (np.array([[1, 1000]] * 4), r"in 0\.\.999"), (head[:3], r"one row per token \(4\)")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"^head .*{why}"):
            encode_draws(rng.integers(0, 1000, size=16), lengths, 1000, head=bad_head)
    with pytest.raises(ValueError, match=r"^Only the interpolative code holds a head: pass"):
        encode_draws(rng.integers(0, 1000, size=16), lengths, 1000, "rice", head=head)
