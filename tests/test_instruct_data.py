"""The LM application's instruction data: offline prompts, the user's files, and what is refused before writing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict
from instruct_fixtures import WORDS, chat_tokenizer

from hf_distill import has_completion, tokenize_instruction_dataset
from hf_distill.errors import InputError
from hf_distill.language_modeling import LMRecipeParser
from hf_distill.language_modeling.instruct_data import (
    MIN_PARAGRAPH_CHARS,
    PROMPT_TASKS,
    build_prompts,
    check_same_tokenizer,
    clip_text,
    load_instruction_data,
    validate_instruction_setup,
)


def documents(n: int, prefix: str, words: int = 30) -> list[str]:
    return [" ".join(f"{prefix}{i}-{k}" for k in range(words)) for i in range(n)]


def speeches(n: int) -> list[str]:
    # a stage direction, then paragraphs long enough to be continued
    long = "x" * MIN_PARAGRAPH_CHARS
    return [f"(Applause.)\nspeech{i} first {long}\nspeech{i} second {long}" for i in range(n)]


SOURCES = {
    "movie_plots": documents(20, "plot"),
    "movie_reviews": documents(20, "review"),
    "speeches": speeches(20),
}


# ---- offline prompts ----------------------------------------------------------------------------------------


def test_clip_text_cuts_at_a_word_boundary_within_the_limit():
    assert clip_text("a  b\n c", 10) == "a b c"
    clipped = clip_text("alpha beta gamma delta epsilon", 20)
    assert clipped == "alpha beta ..." and len(clipped) <= 20


def test_prompts_are_user_turns_shared_between_tasks_and_the_same_for_the_same_seed():
    splits = build_prompts(SOURCES, num_train=10, num_eval=4, seed=3, max_source_chars=60)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "validation": 4}
    train = splits["train"]
    assert train["task"][:3] == [t.name for t in PROMPT_TASKS]  # interleaved
    assert [train["task"].count(t.name) for t in PROMPT_TASKS] == [4, 3, 3]
    instructions = {t.name: t.instruction.replace("{text}", "") for t in PROMPT_TASKS}
    for row in train:
        (turn,) = row["messages"]
        assert turn["role"] == "user" and turn["content"].startswith(instructions[row["task"]])
        assert len(turn["content"]) - len(instructions[row["task"]]) <= 60  # the source text, clipped
    speech = next(r for r in train if r["task"] == "speech_continuation")["messages"][0]["content"]
    assert "Applause" not in speech and "Continue this political speech" in speech
    again = build_prompts(SOURCES, num_train=10, num_eval=4, seed=3, max_source_chars=60)
    assert again["train"].to_list() == train.to_list()
    assert (
        build_prompts(SOURCES, num_train=10, num_eval=4, seed=4, max_source_chars=60)["train"]["document"]
        != (train["document"])
    )


def test_no_document_gives_both_a_training_and_a_held_out_prompt():
    splits = build_prompts(SOURCES, num_train=30, num_eval=15, seed=0)
    for task in PROMPT_TASKS:
        docs = {s: {r["document"] for r in splits[s] if r["task"] == task.name} for s in splits}
        assert docs["train"] and docs["validation"] and not docs["train"] & docs["validation"]


def test_too_few_documents_are_refused_naming_the_corpus():
    sources = {**SOURCES, "speeches": speeches(5)}
    with pytest.raises(
        InputError, match="The speeches corpus has 5 documents, fewer than the 6 prompts task"
    ):
        build_prompts(sources, num_train=15, num_eval=3, seed=0)  # 5 + 1 per task


def test_offline_prompts_tokenize_for_training_as_prompt_only_rows():
    splits = build_prompts(SOURCES, num_train=3, num_eval=3, seed=0)
    tokenizer = chat_tokenizer()
    tokenized, _ = tokenize_instruction_dataset(splits["train"], tokenizer, 512, 8)
    assert all(ids == [] for ids in tokenized["completion_input_ids"])
    assert not any(has_completion(row) for row in splits["train"])


# ---- the user's data ----------------------------------------------------------------------------------------


def script_for(path: Path | str, **settings) -> SimpleNamespace:
    defaults = {
        "dataset_name": str(path),
        "dataset_config_name": None,
        "train_split": "train",
        "validation_split": "auto",
        "validation_size": 0.25,
        "dataset_seed": 0,
        "cache_dir": None,
        "num_train_prompts": None,
        "num_eval_prompts": None,
        "max_source_chars": 400,
    }
    return SimpleNamespace(**{**defaults, **settings})


def chat_rows(n: int, answered: bool) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"w{i % 40} w{(i + 1) % 40}"}]
        if answered:
            messages.append({"role": "assistant", "content": f"w{(i + 2) % 40}"})
        rows.append({"messages": messages, "id": i})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize(
    ("name", "rows", "columns", "completions"),
    [
        ("chat.jsonl", chat_rows(8, answered=True), ["messages"], True),
        ("prompts.jsonl", chat_rows(8, answered=False), ["messages"], False),
        (
            "pairs.csv",
            [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(8)],
            ["prompt", "completion"],
            True,
        ),
        ("prompts.parquet", [{"prompt": f"w{i}", "source": "x"} for i in range(8)], ["prompt"], False),
    ],
)
def test_a_file_of_messages_or_prompts_loads_as_train_and_held_out_rows(
    tmp_path, name, rows, columns, completions
):
    splits, record = load_instruction_data(script_for(write(tmp_path / name, rows)))
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 2}
    assert record["validation"]["source"] == "carved from train"
    for split in splits.values():
        assert split.column_names == columns  # the instruction columns only
        assert all(has_completion(r) for r in split) == completions
    tokenized, _ = tokenize_instruction_dataset(splits["train"], chat_tokenizer(), 32, 8)
    assert all(bool(ids) == completions for ids in tokenized["completion_input_ids"])


def test_the_prompt_counts_cut_the_users_splits(tmp_path):
    path = write(tmp_path / "chat.jsonl", chat_rows(20, answered=True))
    splits, record = load_instruction_data(script_for(path, num_train_prompts=5, num_eval_prompts=2))
    assert (len(splits["train"]), len(splits["validation"])) == (5, 2) == (record["train"]["rows"], 2)


def test_a_file_with_neither_prompts_nor_messages_is_refused(tmp_path):
    path = write(tmp_path / "text.jsonl", [{"text": WORDS[i], "completion": "w1"} for i in range(8)])
    with pytest.raises(InputError, match=r"neither 'prompt' .* nor chat 'messages' columns; its columns are"):
        load_instruction_data(script_for(path))


def test_completions_on_some_rows_only_are_refused(tmp_path):
    rows = chat_rows(4, answered=True) + chat_rows(4, answered=False)
    with pytest.raises(InputError, match="have a completion and the others none"):
        load_instruction_data(script_for(write(tmp_path / "mixed.jsonl", rows), validation_size=1))


# ---- refused before anything is written ---------------------------------------------------------------------


def chat_splits(n: int = 4, content: str = "w1 w2") -> DatasetDict:
    messages = [[{"role": "user", "content": content}]] * n
    return DatasetDict(
        {
            "train": Dataset.from_dict({"messages": messages}),
            "validation": Dataset.from_dict({"messages": messages[:1]}),
        }
    )


def test_a_good_setup_returns_the_longest_prompt_of_each_split():
    longest = validate_instruction_setup(
        chat_splits(),
        chat_tokenizer(),
        student_tokenizer=chat_tokenizer(),
        max_positions=64,
        max_new_tokens=8,
    )
    # <bos> <user> w1 w2 <end> <assistant>
    assert longest == {"train": 6, "validation": 6}


def test_data_without_prompt_or_messages_is_refused():
    splits = {"train": Dataset.from_dict({"text": ["w1"]})}
    with pytest.raises(InputError, match="The train split has neither 'prompt'"):
        validate_instruction_setup(splits, chat_tokenizer())


@pytest.mark.parametrize("data", ["messages", "conversational prompt", "text through the template"])
def test_chat_data_with_a_tokenizer_without_a_chat_template_is_refused(data):
    if data == "messages":
        splits, flag = chat_splits(), False
    elif data == "conversational prompt":
        splits, flag = {"train": Dataset.from_dict({"prompt": [[{"role": "user", "content": "w1"}]]})}, False
    else:
        splits, flag = {"train": Dataset.from_dict({"prompt": ["w1"]})}, True
    with pytest.raises(InputError, match="has no chat template"):
        validate_instruction_setup(splits, chat_tokenizer(with_template=False), chat_template_for_text=flag)
    # plain string prompts need no template
    validate_instruction_setup(
        {"train": Dataset.from_dict({"prompt": ["w1"]})}, chat_tokenizer(with_template=False)
    )


def test_a_prompt_longer_than_the_models_positions_is_refused():
    splits = chat_splits(content=" ".join(WORDS[:20]))  # 24 tokens with the template
    with pytest.raises(
        InputError, match="Row 0 of the train split has a prompt of 24 tokens, longer than the model's 20"
    ):
        validate_instruction_setup(splits, chat_tokenizer(), max_positions=20)
    with pytest.raises(
        InputError, match="with max_new_tokens=8 it needs 32 positions, more than the model's 30"
    ):
        validate_instruction_setup(splits, chat_tokenizer(), max_positions=30, max_new_tokens=8)
    # cut to max_prompt_length as training cuts it, the prompt and its completion fit
    validate_instruction_setup(
        splits, chat_tokenizer(), max_positions=30, max_prompt_length=16, max_new_tokens=8
    )


def test_teacher_and_student_with_different_tokenizers_are_refused_as_cross_tokenizer_kd():
    other = chat_tokenizer()
    other.chat_template = other.chat_template.replace("<end>", "<eos>")
    with pytest.raises(
        InputError, match=r"differ \(chat template\).*Cross-tokenizer KD is not supported yet"
    ):
        validate_instruction_setup(chat_splits(), chat_tokenizer(), student_tokenizer=other)
    reordered = chat_tokenizer(with_template=False)  # the same tokens, two of them with each other's ids
    vocab = reordered.backend_tokenizer.model.__class__(
        {
            **reordered.get_vocab(),
            "w0": reordered.convert_tokens_to_ids("w1"),
            "w1": reordered.convert_tokens_to_ids("w0"),
        },
        unk_token="<unk>",
    )
    reordered.backend_tokenizer.model = vocab
    with pytest.raises(InputError, match=r"differ \(vocabulary, chat template\)"):
        check_same_tokenizer(chat_tokenizer(), reordered)


# ---- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--instruct", "true", "--teacher_modes", "live", "topk"], "set teacher_modes to \\[live\\]"),
        (
            [
                "--instruct",
                "true",
                "--teacher_modes",
                "live",
                "--off_policy_steps",
                "0",
                "--on_policy_steps",
                "0",
            ],
            "nothing to train",
        ),
        (["--dataset_name", "offline:instruct_prompts"], "set instruct to true"),
        (["--num_eval_prompts", "0"], "num_eval_prompts must be >= 1, got 0"),
        (["--max_source_chars", "8"], "max_source_chars must be >= 16, got 8"),
        (["--on_policy_steps", "-1"], "on_policy_steps must be >= 0, got -1"),
    ],
)
def test_bad_instruct_settings_are_refused_at_parse_time(flags, message):
    with pytest.raises(InputError, match=message):
        LMRecipeParser().parse_recipe_and_args([*flags, "--output_dir", "unused"])


def test_prepare_checks_against_the_smallest_models_positions_and_says_who_writes_completions(tmp_path):
    from instruct_fixtures import tiny_llama

    from hf_distill.language_modeling.instruct_data import prepare_instruction_data

    path = write(tmp_path / "prompts.jsonl", chat_rows(8, answered=False))
    script = script_for(path, max_prompt_length=64, chat_template_for_text=False)
    teacher, student = tiny_llama(positions=64), tiny_llama(positions=12)
    data = prepare_instruction_data(script, chat_tokenizer(), [teacher], max_new_tokens=8)
    assert data.has_completions == {"train": False, "validation": False}
    assert data.longest_prompt == {"train": 6, "validation": 6}
    with pytest.raises(
        InputError, match="with max_new_tokens=8 it needs 14 positions, more than the model's 12"
    ):
        prepare_instruction_data(script, chat_tokenizer(), [teacher, student], max_new_tokens=8)
