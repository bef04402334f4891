"""Evaluation at T = 1: held-out perplexity and calibration (token-weighted), forward and generation speed, greedy samples."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..calibration import DEFAULT_BINS, calibration_bins, ece_from_bins


@torch.no_grad()
def perplexity(model: PreTrainedModel, blocks: Dataset, batch_size: int = 8) -> dict[str, float]:
    """``{"loss": nats/token, "perplexity": exp(loss), "ece": ..., "tokens": n}`` over every predicted token.

    Token-weighted: the mean negative log-likelihood over all ``n`` predicted tokens of ``blocks`` (each
    block of ``L`` tokens predicts ``L - 1``), not a mean of per-block means. ``ece``: the expected
    calibration error of the next-token distribution over the same ``n`` tokens (top-1 confidence
    against accuracy, 15 equal-width bins; :mod:`hf_distill.calibration`), from the same forward passes.
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bins = torch.zeros(3, DEFAULT_BINS, dtype=torch.float64)
    ids = torch.tensor(blocks["input_ids"])
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        bins += calibration_bins(logits, batch[:, 1:])
        count += batch[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "ece": ece_from_bins(bins), "tokens": count}


@torch.no_grad()
def forward_speed(model: PreTrainedModel, blocks: Dataset, batch_size: int = 8, repeats: int = 3) -> float:
    """Tokens per second of the forward pass over up to ``batch_size`` blocks, the fastest of ``repeats``."""
    model.eval()
    device = next(model.parameters()).device
    batch = torch.tensor(blocks[:batch_size]["input_ids"]).to(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=batch)
        best = min(best, time.perf_counter() - start)
    return batch.numel() / best


@torch.no_grad()
def greedy_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> tuple[list[dict[str, str]], float]:
    """``(samples, tokens/s)``: each prompt's greedy continuation, and the generation speed over all prompts."""
    model.eval()
    device = next(model.parameters()).device
    samples, generated, seconds = [], 0, 0.0
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        start = time.perf_counter()
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # the same work for every model, for the speed
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        seconds += time.perf_counter() - start
        new = out[0, inputs["input_ids"].shape[1] :]
        generated += len(new)
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True)})
    return samples, generated / seconds if seconds else 0.0
