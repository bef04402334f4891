"""Instruction rows: rendering, tokenizing, refusals, and batches whose prompts never count in the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from instruct_fixtures import chat_tokenizer

from hf_distill import InputError
from hf_distill.instruction_data import (
    InstructionDataCollator,
    render_example,
    render_prompt,
    tokenize_instruction_dataset,
)
from hf_distill.losses import generalized_jsd_loss


def test_prompt_completion_strings_are_raw_text_with_eos():
    tok = chat_tokenizer()
    assert render_example({"prompt": "w1 w2", "completion": "w3"}, tok) == ("w1 w2", "w3<eos>")
    assert render_example({"prompt": "w1"}, tok) == ("w1", "")


def test_chat_messages_render_the_prompt_with_the_generation_prompt():
    tok = chat_tokenizer()
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    prompt, completion = render_example({"messages": messages}, tok)
    assert prompt == "<bos> <user> w1 w2 <end> <assistant>"
    assert completion == " w3 w4 <end><eos>"
    # The same prompt for a conversational prompt, a prompt-only chat, and a string with the setting on.
    assert render_prompt({"prompt": messages[:1]}, tok) == prompt
    assert render_prompt({"messages": messages[:1]}, tok) == prompt
    assert render_prompt({"prompt": "w1 w2"}, tok, chat_template_for_text=True) == prompt
    assert render_example({"prompt": "w1 w2", "completion": "w3 w4"}, tok, chat_template_for_text=True) == (
        prompt,
        completion,
    )


def test_tokenize_gives_ids_and_counts_cut_completions():
    tok = chat_tokenizer()
    data = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4"], "completion": ["w5 w6 w7 w8", "w9"]})
    out, counts = tokenize_instruction_dataset(data, tok, max_prompt_length=2, max_completion_length=3)
    assert out.column_names == ["prompt_input_ids", "completion_input_ids"]
    assert out[0]["prompt_input_ids"] == tok("w2 w3")["input_ids"]  # the prompt keeps its end
    assert out[0]["completion_input_ids"] == tok("w5 w6 w7", add_special_tokens=False)["input_ids"]
    assert out[1]["completion_input_ids"] == tok("w9 <eos>", add_special_tokens=False)["input_ids"]
    assert (counts.prompts, counts.completions) == (1, 1)
    prompts_only, counts = tokenize_instruction_dataset(data.remove_columns("completion"), tok, 8, 8)
    assert prompts_only[1]["completion_input_ids"] == [] and counts.completions == 0


def test_refusals_say_what_to_fix():
    tok = chat_tokenizer()
    with pytest.raises(InputError, match=r"it has \['question', 'answer'\]"):
        tokenize_instruction_dataset(Dataset.from_dict({"question": ["a"], "answer": ["b"]}), tok, 8, 8)
    chat = Dataset.from_dict({"messages": [[{"role": "user", "content": "w1"}]]})
    with pytest.raises(InputError, match="need a chat template"):
        tokenize_instruction_dataset(chat, chat_tokenizer(with_template=False), 8, 8)
    with pytest.raises(InputError, match="need a chat template"):
        render_prompt({"prompt": "w1"}, chat_tokenizer(with_template=False), chat_template_for_text=True)
    long = Dataset.from_dict({"prompt": ["w1 w2 w3 w4 w5"]})
    with pytest.raises(InputError, match="Row 0's prompt is 5 tokens, more than the model's 4 positions"):
        tokenize_instruction_dataset(long, tok, 8, 8, max_positions=4)


def test_collator_pads_and_labels_only_the_completion():
    rows = [
        {"prompt_input_ids": [10, 11, 12], "completion_input_ids": [13, 1]},
        {"prompt_input_ids": [20], "completion_input_ids": []},
    ]
    batch = InstructionDataCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 1], [20, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 13, 1], [-100] * 5]
    assert batch["prompt_input_ids"].tolist() == [[10, 11, 12], [0, 0, 20]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prompt_positions_contribute_nothing_to_masked_losses():
    rows = [
        {"prompt_input_ids": [10, 11, 12], "completion_input_ids": [13, 14, 1]},
        {"prompt_input_ids": [20, 21], "completion_input_ids": [22, 1]},
    ]
    batch = InstructionDataCollator(pad_token_id=0)(rows)
    labels = batch["labels"][:, 1:]  # position t is scored against token t + 1
    mask = labels != -100
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, labels.shape[1], 47, generator=g)
    teacher = torch.randn(2, labels.shape[1], 47, generator=g)

    def losses(s):
        ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ce, generalized_jsd_loss(s, teacher, 0.9, 0.5, mask=mask)

    before = losses(student)
    changed = student.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 47, generator=g)
    for a, b in zip(before, losses(changed), strict=True):
        torch.testing.assert_close(a, b)
    changed[mask] += torch.randn(int(mask.sum()), 47, generator=g)  # completion positions do count
    assert all(not torch.allclose(a, b) for a, b in zip(before, losses(changed), strict=True))
