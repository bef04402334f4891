"""The default generator on a tiny Llama: shapes, the mask after EOS, greedy determinism, truncation count."""

from __future__ import annotations

import torch
from instruct_fixtures import tiny_llama

from hf_distill.generation import TransformersGenerator, mask_after_eos

PROMPTS = torch.tensor([[0, 0, 3, 10, 11], [3, 12, 13, 14, 15], [0, 3, 16, 17, 18]])
MASK = (PROMPTS != 0).long()


def test_mask_after_eos_keeps_up_to_the_first_eos():
    ids = torch.tensor([[5, 1, 6, 1], [5, 6, 7, 8], [1, 5, 6, 7]])
    out, mask, has_eos = mask_after_eos(ids, [1], pad_token_id=0)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert out.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_greedy_is_deterministic_and_stops_at_eos():
    model = tiny_llama()
    model.train()
    first = TransformersGenerator(pad_token_id=0, eos_token_id=1).generate(
        model, PROMPTS, MASK, max_new_tokens=8, do_sample=False
    )
    assert model.training  # the mode it was in comes back
    again = TransformersGenerator(pad_token_id=0, eos_token_id=1).generate(
        model, PROMPTS, MASK, max_new_tokens=8, do_sample=False
    )
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert first.completion_ids.shape[0] == 3 and first.completion_ids.shape[1] <= 8
    # Make the token row 0 emits at some step j (its first occurrence) the EOS: row 0 then stops at j.
    row = first.completion_ids[0].tolist()
    j = next(i for i in range(1, len(row)) if row[i] not in row[:i])
    stop = TransformersGenerator(pad_token_id=0, eos_token_id=[1, row[j]]).generate(
        model, PROMPTS, MASK, max_new_tokens=8, do_sample=False
    )
    assert stop.completion_ids[0, : j + 1].tolist() == row[: j + 1]
    assert stop.completion_mask[0].tolist() == [True] * (j + 1) + [False] * (
        stop.completion_ids.shape[1] - j - 1
    )
    assert (stop.completion_ids[0, j + 1 :] == 0).all()
    # Rows without either EOS in the first run's 8 tokens are the ones cut at max_new_tokens.
    expected_cut = sum(1 for r in first.completion_ids.tolist() if 1 not in r and row[j] not in r)
    assert stop.num_truncated == expected_cut


def test_sampling_shapes_and_truncation_when_no_row_can_end():
    model = tiny_llama()
    out = TransformersGenerator(pad_token_id=0, eos_token_id=1).generate(
        model, PROMPTS, MASK, max_new_tokens=5, temperature=0.9, top_p=0.95, do_sample=True
    )
    assert out.completion_ids.shape == out.completion_mask.shape
    has_eos = (out.completion_ids == 1).any(-1)
    assert out.num_truncated == int((~has_eos).sum())
    if out.num_truncated:
        assert out.completion_ids.shape[1] == 5


def test_sampling_draws_from_the_whole_vocabulary_not_the_top_50():
    """transformers fills top_k=None with 50: a uniform next-token distribution over 200 ids would then give at
    most 50 distinct tokens. GKD and TRL sample without a top-k filter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next token equally likely
    prompts = torch.full((400, 2), 5)
    out = TransformersGenerator(pad_token_id=0, eos_token_id=1).generate(
        model, prompts, torch.ones_like(prompts), max_new_tokens=1, temperature=1.0, do_sample=True
    )
    assert len(set(out.completion_ids[:, 0].tolist())) > 100
