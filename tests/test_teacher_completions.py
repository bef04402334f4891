"""The teacher's completions of prompts: generated once, cached with provenance, reused, cut ones counted."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from instruct_fixtures import WORDS, chat_tokenizer, tiny_llama

from hf_distill import tokenize_instruction_dataset
from hf_distill.errors import InputError
from hf_distill.generation import Generation, TransformersGenerator, mask_after_eos
from hf_distill.teacher_completions import (
    TRUNCATED_COLUMN,
    completions_paths,
    end_token_ids,
    teacher_completions,
)

EOS = 1


class Counting:
    """A :class:`hf_distill.Generator` that counts the calls and rows it is given."""

    def __init__(self):
        self.inner, self.calls, self.rows = TransformersGenerator(pad_token_id=0, eos_token_id=EOS), 0, 0

    def generate(self, model, prompt_input_ids, prompt_attention_mask, **settings) -> Generation:
        self.calls += 1
        self.rows += prompt_input_ids.shape[0]
        return self.inner.generate(model, prompt_input_ids, prompt_attention_mask, **settings)


class Scripted:
    """Completions fixed by the test: a prompt holding ``w0`` is answered ``w5 w6 <eos>``; any other runs
    ``w5`` up to ``max_new_tokens`` without an end."""

    def __init__(self, tokenizer):
        self.w0, self.w5, self.w6 = tokenizer.convert_tokens_to_ids(["w0", "w5", "w6"])

    def generate(self, model, prompt_input_ids, prompt_attention_mask, *, max_new_tokens, **_) -> Generation:
        rows = []
        for ids in prompt_input_ids.tolist():
            row = [self.w5, self.w6, EOS] if self.w0 in ids else [self.w5] * max_new_tokens
            rows.append((row + [EOS] * max_new_tokens)[:max_new_tokens])
        ids, mask, has_eos = mask_after_eos(torch.tensor(rows), [EOS], 0)
        return Generation(ids, mask, int((~has_eos).sum()))


def chat_prompts(n: int = 5, offset: int = 0) -> Dataset:
    contents = [" ".join(WORDS[offset + i : offset + i + 2 + i % 3]) for i in range(n)]
    return Dataset.from_dict({"messages": [[{"role": "user", "content": c}] for c in contents]})


def test_a_second_call_reads_the_cache_and_generates_nothing(tmp_path):
    model, tokenizer = tiny_llama().eval(), chat_tokenizer()
    first_gen = Counting()
    first = teacher_completions(
        model,
        tokenizer,
        chat_prompts(),
        max_new_tokens=4,
        cache_dir=tmp_path,
        generator=first_gen,
        batch_size=2,
    )
    assert (first_gen.calls, first_gen.rows, first.cached) == (3, 5, False)
    folder, provenance_file = completions_paths(tmp_path, first.key)
    assert folder.is_dir() and provenance_file.is_file()
    again_gen = Counting()
    again = teacher_completions(
        model,
        tokenizer,
        chat_prompts(),
        max_new_tokens=4,
        cache_dir=tmp_path,
        generator=again_gen,
        batch_size=2,
    )
    assert again_gen.calls == 0 and again.cached and again.key == first.key
    assert again.dataset.to_list() == first.dataset.to_list()
    provenance = json.loads(provenance_file.read_text())
    assert provenance["num_truncated"] == first.num_truncated == again.num_truncated
    assert provenance["generation"]["max_new_tokens"] == 4 and provenance["generation"]["do_sample"] is False
    assert provenance["num_rows"] == 5 and provenance["chat_template_hash"]
    # the completion is the last assistant turn, after the user's
    for row in again.dataset:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def _with_other_template(tokenizer):
    tokenizer.chat_template = tokenizer.chat_template.replace("<end>", "<end> ")
    return tokenizer


@pytest.mark.parametrize(
    "change",
    ["max_new_tokens", "batch_size", "chat_template", "teacher_weights", "prompts", "chat_template_for_text"],
)
def test_anything_that_changes_the_completions_changes_the_key(tmp_path, change):
    settings = {"max_new_tokens": 3, "batch_size": 2, "cache_dir": tmp_path}
    model, tokenizer, prompts = tiny_llama().eval(), chat_tokenizer(), chat_prompts()
    base = teacher_completions(model, tokenizer, prompts, generator=Counting(), **settings)
    if change in ("max_new_tokens", "batch_size"):
        settings[change] += 1
    elif change == "chat_template":
        tokenizer = _with_other_template(tokenizer)
    elif change == "teacher_weights":
        model = tiny_llama(seed=1).eval()
    elif change == "prompts":
        prompts = chat_prompts(offset=1)
    else:
        settings["chat_template_for_text"] = True
    counting = Counting()
    other = teacher_completions(model, tokenizer, prompts, generator=counting, **settings)
    assert other.key != base.key and counting.calls > 0 and not other.cached
    assert len(list(tmp_path.glob("teacher-completions-*.json"))) == 2


def test_completions_cut_by_max_new_tokens_are_counted_kept_and_recorded(tmp_path):
    tokenizer = chat_tokenizer()
    prompts = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": c}] for c in ["w0 w1", "w2 w3 w4", "w1 w0", "w7"]]}
    )
    out = teacher_completions(
        tiny_llama().eval(),
        tokenizer,
        prompts,
        max_new_tokens=4,
        cache_dir=tmp_path,
        generator=Scripted(tokenizer),
        batch_size=3,
    )
    assert out.num_truncated == 2 and out.provenance["num_truncated"] == 2
    assert out.dataset[TRUNCATED_COLUMN] == [False, True, False, True]
    answers = [row["messages"][-1]["content"] for row in out.dataset]
    assert answers == ["w5 w6", "w5 w5 w5 w5", "w5 w6", "w5 w5 w5 w5"]  # the end token is not in the text
    # what training reads: the completion through the chat template, ending with its end of turn and EOS
    tokenized, counts = tokenize_instruction_dataset(out.dataset, tokenizer, 32, 8)
    assert counts.completions == 0
    assert tokenizer.convert_ids_to_tokens(tokenized[0]["completion_input_ids"]) == [
        "w5",
        "w6",
        "<end>",
        "<eos>",
    ]


def test_string_prompts_get_a_completion_column():
    tokenizer = chat_tokenizer()
    prompts = Dataset.from_dict({"prompt": ["w0 w1", "w2 w3"], "source": ["a", "b"]})
    out = teacher_completions(
        tiny_llama().eval(),
        tokenizer,
        prompts,
        max_new_tokens=4,
        cache_dir=None,
        generator=Scripted(tokenizer),
    )
    assert out.dataset["completion"] == ["w5 w6", "w5 w5 w5 w5"] and out.dataset["source"] == ["a", "b"]
    assert not out.cached


def test_the_default_generator_is_transformers_generate_stopping_at_the_models_end_tokens():
    model, tokenizer = tiny_llama().eval(), chat_tokenizer()
    assert end_token_ids(model, tokenizer) == [EOS]
    out = teacher_completions(model, tokenizer, chat_prompts(3), max_new_tokens=5, cache_dir=None)
    assert len(out.dataset) == 3
    for row, cut in zip(out.dataset, out.dataset[TRUNCATED_COLUMN], strict=True):
        words = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        assert len(words) <= 5 and (not cut or len(words) == 5)


def test_prompts_that_already_have_completions_are_refused():
    rows = [[{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]]
    with pytest.raises(InputError, match="already have a completion"):
        teacher_completions(
            tiny_llama(),
            chat_tokenizer(),
            Dataset.from_dict({"messages": rows}),
            max_new_tokens=2,
            cache_dir=None,
        )


def test_a_cache_whose_provenance_disagrees_is_refused_with_both_values(tmp_path):
    model, tokenizer = tiny_llama().eval(), chat_tokenizer()
    first = teacher_completions(model, tokenizer, chat_prompts(), max_new_tokens=3, cache_dir=tmp_path)
    _, provenance_file = completions_paths(tmp_path, first.key)
    provenance = json.loads(provenance_file.read_text())
    provenance["generation"]["max_new_tokens"] = 99
    provenance_file.write_text(json.dumps(provenance))
    with pytest.raises(
        InputError, match=r"does not match.*generation: cache has .*99.*asked for .*'max_new_tokens': 3"
    ):
        teacher_completions(model, tokenizer, chat_prompts(), max_new_tokens=3, cache_dir=tmp_path)
