"""Completions for on-policy distillation: one interface, transformers' ``generate`` behind it by default.

A :class:`Generator` turns left-padded prompts into completions:

    generate(model, prompt_input_ids (B, P), prompt_attention_mask (B, P), *,
             max_new_tokens, temperature, top_p, do_sample) -> Generation

and :class:`Generation` holds ``completion_ids`` ``(B, N)`` (``N <= max_new_tokens``), padded with
``pad_token_id`` after each row's first EOS; ``completion_mask`` ``(B, N)``, true up to and including that EOS;
and ``num_truncated``, how many rows reached ``max_new_tokens`` without an EOS.

:class:`TransformersGenerator` is the default: ``model.generate`` with the KV cache, on the model unwrapped from
DDP / ``torch.compile``, in eval mode and restored to the mode it was in.

A vLLM backend plugs in as another class with the same ``generate`` method, used where vLLM is installed on a
GPU (as TRL's ``use_vllm``): it keeps an ``LLM`` engine, loads the student's current weights into it before
generating (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(model.state_dict().items())``
or a server's weight-update endpoint), turns each row of ``prompt_input_ids`` with its mask into a token-id prompt,
calls ``llm.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=..., top_p=...))``, and pads
the returned token ids into the same :class:`Generation`. Nothing else in the trainer changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import GenerationConfig, PreTrainedModel


@dataclass
class Generation:
    """Completions of one batch of prompts.

    ``completion_ids``: ``(B, N)`` long, pad after the first EOS; ``completion_mask``: ``(B, N)`` bool, true up to
    and including the first EOS (all true in a row without one); ``num_truncated``: rows cut at ``max_new_tokens``.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    num_truncated: int


class Generator(Protocol):
    def generate(
        self,
        model: torch.nn.Module,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
    ) -> Generation: ...


def mask_after_eos(
    completion_ids: torch.Tensor, eos_token_ids: list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, has_eos)`` for ``completion_ids`` ``(B, N)``: ``mask[b, t]`` is true for ``t`` up to and
    including row ``b``'s first token in ``eos_token_ids``; ``ids`` is ``completion_ids`` with ``pad_token_id``
    where the mask is false; ``has_eos`` ``(B,)`` says which rows hold an EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    # Number of EOS strictly before t: zero up to and including the first EOS.
    before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = before == 0
    return completion_ids.masked_fill(~mask, pad_token_id), mask, is_eos.any(-1)


@dataclass
class TransformersGenerator:
    """:class:`Generator` with transformers' ``generate`` (KV cache on). ``eos_token_id`` may be one id or
    several (e.g. an instruct model's EOS and end-of-turn)."""

    pad_token_id: int
    eos_token_id: int | list[int]

    def generate(
        self,
        model: torch.nn.Module,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
    ) -> Generation:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(
                f"Sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature} and {top_p}."
            )
        eos = [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)
        unwrapped: PreTrainedModel = extract_model_from_parallel(model)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            top_k=0 if do_sample else None,  # no top-k filter (None would mean transformers' default of 50)
            pad_token_id=self.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
        )
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad():
                out = unwrapped.generate(
                    input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, generation_config=config
                )
        finally:
            unwrapped.train(was_training)
        ids, mask, has_eos = mask_after_eos(out[:, prompt_input_ids.shape[1] :], eos, self.pad_token_id)
        return Generation(completion_ids=ids, completion_mask=mask, num_truncated=int((~has_eos).sum()))
