"""Instruction data for on-policy distillation (GKD): prompts, completions, and their batches.

A row is one of (checked in this order):

- chat ``messages``: a list of ``{"role", "content"}``; the last ``assistant`` turn is the completion and
  every turn before it the prompt;
- ``prompt`` and ``completion``: strings, or (as in TRL's conversational format) lists of messages;
- ``prompt`` alone: the completion is empty, for data whose completions the student or teacher generates.

A prompt given as messages is rendered with the tokenizer's chat template and ``add_generation_prompt=True``,
the same text for training, generation and evaluation. A prompt given as a string is used as it is, as TRL
does; with ``chat_template_for_text=True`` it is wrapped as one user turn and rendered through the chat
template instead, for an instruct model fed plain instructions. The completion ends with the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import InputError

IGNORE_INDEX = -100


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise InputError(
            f"Chat messages (or chat_template_for_text=True) need a chat template, and the tokenizer "
            f"{type(tokenizer).__name__} has none; use an instruct model's tokenizer or set tokenizer.chat_template."
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _split_messages(row: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    messages = row["messages"]
    if not _is_messages(messages) or not messages:
        raise InputError(
            f"'messages' must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}."
        )
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1:]
    return messages, []


def has_completion(row: dict[str, Any]) -> bool:
    """Whether ``row`` carries its completion: ``messages`` ending with an ``assistant`` turn, or a non-empty
    ``completion`` (checked in the order :func:`render_example` reads them)."""
    if row.get("messages") is not None:
        messages = row["messages"]
        return _is_messages(messages) and bool(messages) and messages[-1]["role"] == "assistant"
    return bool(row.get("completion"))


def render_prompt(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, chat_template_for_text: bool = False
) -> str:
    """The prompt text of ``row``: chat messages through the chat template (with the generation prompt),
    a string as it is (or as one user turn through the template with ``chat_template_for_text``)."""
    return render_example(row, tokenizer, chat_template_for_text=chat_template_for_text)[0]


def render_example(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, chat_template_for_text: bool = False
) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` of one row; the completion ends with ``tokenizer.eos_token``
    and is ``""`` for a prompt-only row.

    For chat data the completion is the chat template's rendering of the whole conversation minus the
    prompt's rendering (so it carries the template's end-of-turn marks), or the assistant's content when
    the template does not render the prompt as a prefix of the whole.
    """
    if "messages" in row and row["messages"] is not None:
        prompt_messages, completion_messages = _split_messages(row)
    elif "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion")
        if _is_messages(prompt):
            prompt_messages = prompt
            completion_messages = completion if _is_messages(completion) else []
            if isinstance(completion, str) and completion:
                completion_messages = [{"role": "assistant", "content": completion}]
        elif isinstance(prompt, str):
            if chat_template_for_text:
                prompt_messages = [{"role": "user", "content": prompt}]
                completion_messages = [{"role": "assistant", "content": completion}] if completion else []
            else:
                return prompt, _with_eos(completion or "", tokenizer)
        else:
            raise InputError(
                f"'prompt' must be a string or a list of chat messages, got {type(prompt).__name__}."
            )
    else:
        raise InputError(
            f"An instruction row needs 'prompt' (and optionally 'completion') or chat 'messages'; this one has "
            f"columns {sorted(row)}. Rename your columns to prompt/completion or messages."
        )
    prompt_text = _chat(tokenizer, prompt_messages, add_generation_prompt=True)
    if not completion_messages:
        return prompt_text, ""
    full = _chat(tokenizer, prompt_messages + completion_messages, add_generation_prompt=False)
    if full.startswith(prompt_text):
        completion_text = full[len(prompt_text) :]
    else:
        completion_text = "".join(str(m["content"]) for m in completion_messages)
    return prompt_text, _with_eos(completion_text, tokenizer)


def _with_eos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    if not text:
        return ""
    eos = tokenizer.eos_token
    if eos is None:
        raise InputError("The tokenizer has no eos_token; set tokenizer.eos_token so completions can end.")
    return text if text.rstrip().endswith(eos) else text + eos


@dataclass(frozen=True)
class TruncationCounts:
    """How many rows :func:`tokenize_instruction_dataset` cut: prompts kept by their last
    ``max_prompt_length`` tokens, completions kept by their first ``max_completion_length``."""

    prompts: int
    completions: int


def tokenize_instruction_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    max_completion_length: int,
    *,
    max_positions: int | None = None,
    chat_template_for_text: bool = False,
) -> tuple[Dataset, TruncationCounts]:
    """Columns ``prompt_input_ids`` and ``completion_input_ids`` (lists of ints; the latter empty for
    prompt-only rows) in place of the dataset's own, and the counts of rows cut.

    A prompt rendered through the chat template is tokenized without added special tokens (the template
    writes them); a raw string prompt with them (e.g. BOS). Completions never get added special tokens.
    A prompt longer than ``max_prompt_length`` keeps its last tokens (as TRL does) and a completion longer
    than ``max_completion_length`` its first; both are counted, not dropped. A prompt longer than
    ``max_positions`` (the model's ``max_position_embeddings``) is refused.
    """
    if max_prompt_length < 1 or max_completion_length < 0:
        raise InputError(
            f"max_prompt_length={max_prompt_length} must be >= 1 and max_completion_length="
            f"{max_completion_length} >= 0."
        )
    columns = set(dataset.column_names)
    if "messages" not in columns and "prompt" not in columns:
        raise InputError(
            f"An instruction dataset needs 'prompt' (and optionally 'completion') or chat 'messages' columns; "
            f"it has {dataset.column_names}. Rename your columns to prompt/completion or messages."
        )

    def tokenize(row: dict[str, Any], index: int) -> dict[str, Any]:
        prompt_text, completion_text = render_example(
            row, tokenizer, chat_template_for_text=chat_template_for_text
        )
        templated = (
            _is_messages(row.get("prompt")) or row.get("messages") is not None or chat_template_for_text
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
        completion_ids = (
            tokenizer(completion_text, add_special_tokens=False)["input_ids"] if completion_text else []
        )
        if max_positions is not None and len(prompt_ids) > max_positions:
            raise InputError(
                f"Row {index}'s prompt is {len(prompt_ids)} tokens, more than the model's {max_positions} positions; "
                "shorten it or drop the row."
            )
        return {
            "prompt_input_ids": prompt_ids[-max_prompt_length:],
            "completion_input_ids": completion_ids[:max_completion_length],
            "prompt_cut": len(prompt_ids) > max_prompt_length,
            "completion_cut": len(completion_ids) > max_completion_length,
        }

    tokenized = dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names)
    counts = TruncationCounts(
        prompts=sum(tokenized["prompt_cut"]), completions=sum(tokenized["completion_cut"])
    )
    return tokenized.remove_columns(["prompt_cut", "completion_cut"]), counts


def pad_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id instruction batches are padded with: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class InstructionDataCollator:
    """Pads rows of ``prompt_input_ids`` / ``completion_input_ids`` into one batch of:

    - ``input_ids``, ``attention_mask``: ``(B, L)``, prompt then completion, right-padded with ``pad_token_id``;
    - ``labels``: ``(B, L)``, the completion's tokens and ``-100`` on prompt and padding (unshifted, as
      transformers' causal LMs take them: position ``t``'s logits are scored against ``labels[t + 1]``);
    - ``prompt_input_ids``, ``prompt_attention_mask``: ``(B, P)``, the prompts left-padded for generation.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_input_ids"]) for f in features]
        completions = [list(f["completion_input_ids"]) for f in features]
        length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        prompt_length = max(len(p) for p in prompts)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        prompt_ids = torch.full((batch, prompt_length), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((batch, prompt_length), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            n = len(p) + len(c)
            input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, :n] = 1
            if c:
                labels[i, len(p) : n] = torch.tensor(c, dtype=torch.long)
            if p:
                prompt_ids[i, prompt_length - len(p) :] = torch.tensor(p, dtype=torch.long)
                prompt_mask[i, prompt_length - len(p) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_input_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
        }
