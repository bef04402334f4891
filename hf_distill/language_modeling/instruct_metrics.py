"""Held-out metrics for the GKD regimes (on-policy, off-policy, supervised): pure functions of models and batches.

- ``reverse_kl``: ``KL(p_s || p_t)`` per token on the student's own sampled completions, the divergence
  on-policy training (``mixture = 1``) minimises where the student will actually be;
- ``forward_kl``: ``KL(p_t || p_s)`` per token on the teacher's completions, the supervised-KD divergence;
- ``rouge_l``: ROUGE-L F1 of the student's greedy completion against the teacher's greedy completion.

Both KLs are over the whole vocabulary at each completion position (not one-sample estimates) at ``T = 1`` by
default, and token-weighted: ``sum over counted positions of KL / number of counted positions``, so each
function returns ``(sum, count)`` for callers to add across batches before dividing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from ..generation import Generator


def completion_logits(
    model: torch.nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """``(B, N, V)`` logits that predict each completion token: position ``P - 1 + t`` of ``model`` run on
    ``[prompt (B, P) left-padded, completion (B, N) right-padded]``, with position ids counted from each
    row's first real token (as ``generate`` does for left-padded prompts)."""
    input_ids = torch.cat([prompt_input_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask.long(), completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    p, n = prompt_input_ids.shape[1], completion_ids.shape[1]
    return logits[:, p - 1 : p - 1 + n].float()


def token_kl(
    logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_{b,t: mask} KL(p[b,t] || q[b,t]), number of counted positions)`` with ``p = softmax(z_p / T)``,
    ``q = softmax(z_q / T)``. Shapes: logits ``(B, N, V)``, ``mask`` ``(B, N)``."""
    log_p = F.log_softmax(logits_p.float() / temperature, dim=-1)
    log_q = F.log_softmax(logits_q.float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = mask.bool()
    return per_position[mask].sum(), mask.sum()


@torch.no_grad()
def reverse_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    generator: Generator,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of per-token ``KL(p_s || p_t)`` on the student's completions sampled at ``temperature``.

    Both models run in eval mode (each restored to its mode after)."""
    gen = generator.generate(
        student,
        prompt_input_ids,
        prompt_attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        do_sample=True,
    )
    args = (prompt_input_ids, prompt_attention_mask, gen.completion_ids, gen.completion_mask)
    was = student.training, teacher.training
    student.eval(), teacher.eval()
    try:
        return token_kl(
            completion_logits(student, *args), completion_logits(teacher, *args), gen.completion_mask
        )
    finally:
        student.train(was[0]), teacher.train(was[1])


def forward_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    generator: Generator,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of per-token ``KL(p_t || p_s)`` on the teacher's completions sampled at ``temperature``:
    :func:`reverse_kl` with the roles swapped."""
    return reverse_kl(
        teacher,
        student,
        prompt_input_ids,
        prompt_attention_mask,
        generator,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )


def rouge_l(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int = 128,
) -> list[float]:
    """ROUGE-L F1 (``rouge-score``, its default tokenization) per row of the student's greedy completion
    (prediction) against the teacher's greedy completion (reference), both decoded without special tokens."""
    texts = []
    for model in (student, teacher):
        gen = generator.generate(
            model, prompt_input_ids, prompt_attention_mask, max_new_tokens=max_new_tokens, do_sample=False
        )
        texts.append(
            tokenizer.batch_decode(
                gen.completion_ids.masked_fill(~gen.completion_mask, tokenizer.pad_token_id),
                skip_special_tokens=True,
            )
        )
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [
        scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure
        for prediction, reference in zip(*texts, strict=True)
    ]
