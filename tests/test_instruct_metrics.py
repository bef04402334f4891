"""Held-out metrics of the GKD regimes on tiny Llamas and hand-checked toy cases."""

from __future__ import annotations

import math

import torch
from instruct_fixtures import chat_tokenizer, tiny_llama

from hf_distill.generation import TransformersGenerator
from hf_distill.language_modeling.instruct_metrics import (
    completion_logits,
    forward_kl,
    reverse_kl,
    rouge_l,
    token_kl,
)

PROMPTS = torch.tensor([[0, 0, 3, 10, 11], [3, 12, 13, 14, 15]])
MASK = (PROMPTS != 0).long()
GEN = TransformersGenerator(pad_token_id=0, eos_token_id=1)


def test_token_kl_by_hand_is_token_weighted():
    # Row 0: two counted positions, p = (1/2, 1/2), q = (1/4, 3/4); row 1: one position, identical.
    p = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]], [[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]]]))
    q = torch.log(
        torch.tensor([[[0.25, 0.75], [0.25, 0.75], [0.1, 0.9]], [[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]]])
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    total, count = token_kl(p, q, mask)
    one = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert count.item() == 3
    assert math.isclose((total / count).item(), 2 * one / 3, rel_tol=1e-5)


def test_completion_logits_line_up_with_an_unpadded_run():
    model = tiny_llama().eval()
    completion = torch.tensor([[20, 21, 1], [22, 1, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = completion_logits(model, PROMPTS, MASK, completion, completion_mask)
    alone = model(torch.tensor([[3, 10, 11, 20, 21, 1]])).logits[0, 2:5]
    torch.testing.assert_close(logits[0], alone, atol=1e-4, rtol=1e-4)


def test_reverse_kl_of_a_model_against_itself_is_zero_and_positive_against_another():
    student, teacher = tiny_llama(0), tiny_llama(1)
    torch.manual_seed(0)
    total, count = reverse_kl(student, student, PROMPTS, MASK, GEN, max_new_tokens=6)
    assert count.item() > 0 and abs(total.item()) < 1e-5
    torch.manual_seed(0)
    rev_total, rev_count = reverse_kl(student, teacher, PROMPTS, MASK, GEN, max_new_tokens=6)
    torch.manual_seed(0)
    fwd_total, fwd_count = forward_kl(student, teacher, PROMPTS, MASK, GEN, max_new_tokens=6)
    assert rev_total.item() > 0 and fwd_total.item() > 0
    # forward_kl samples the teacher: on the same draws it is KL(teacher || student), reverse_kl with roles swapped.
    torch.manual_seed(0)
    swapped_total, swapped_count = reverse_kl(teacher, student, PROMPTS, MASK, GEN, max_new_tokens=6)
    torch.testing.assert_close(fwd_total, swapped_total)
    assert fwd_count == swapped_count


def test_rouge_l_is_one_for_the_teacher_itself_and_lower_for_another_student():
    tok = chat_tokenizer()
    teacher = tiny_llama(1)
    assert rouge_l(teacher, teacher, PROMPTS, MASK, GEN, tok, max_new_tokens=6) == [1.0, 1.0]
    scores = rouge_l(tiny_llama(0), teacher, PROMPTS, MASK, GEN, tok, max_new_tokens=6)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores) and min(scores) < 1.0
