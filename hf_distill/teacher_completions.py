"""The teacher's completions of a set of prompts: generated once (greedy), cached with provenance, reused.

Supervised KD on instruction data (the off-policy twin of an on-policy run, and the SFT baseline) learns from
the teacher's own completions of the prompts. :func:`teacher_completions` tokenizes each prompt as training
does (:func:`hf_distill.tokenize_instruction_dataset`: the chat template with the generation prompt), has the
teacher complete it greedily through a :class:`hf_distill.Generator` (:class:`hf_distill.TransformersGenerator`
by default), and returns the rows with their completion added, in the form
:func:`~hf_distill.tokenize_instruction_dataset` reads:

- a ``messages`` row gets an ``{"role": "assistant", "content": ...}`` turn appended;
- a ``prompt`` row (a string or messages) gets a ``completion`` string;
- every row gets ``completion_truncated``: true when the teacher reached ``max_new_tokens`` without an end token.
  Such a completion is kept (its text stops mid-way and training appends the end of turn to it) and counted in
  :attr:`TeacherCompletions.num_truncated` and the provenance, never dropped silently.

The completion's text is the decoded tokens before the first end token (``skip_special_tokens=True``).

**The cache.** Under ``cache_dir`` a ``save_to_disk`` folder ``teacher-completions-<key>`` and, written last, its
provenance ``teacher-completions-<key>.json``. The key hashes (:func:`completions_key`) everything that changes
the completions: the teacher's class, weights (:func:`hf_distill.teacher_cache.weights_hash`) and config; the
tokenizer (:func:`hf_distill.teacher_cache.tokenizer_hash`) and its chat template; the prompts' token ids in order;
and the generation settings (generator class, greedy, ``max_new_tokens``, end and pad ids, batch size, since
padding can change a greedy tie). A different request has a different key, hence its own folder. A cache is used
only when its folder and provenance both exist and the provenance's components equal the ones asked for; a
mismatch is refused naming both values. Under ``accelerate launch`` the main process generates and writes first,
and the other processes then read its cache.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_from_disk
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import InputError
from .generation import Generator, TransformersGenerator
from .instruction_data import (
    InstructionDataCollator,
    has_completion,
    pad_token_id_of,
    tokenize_instruction_dataset,
)
from .tasks import base_model
from .teacher_cache.key import _config_hash, tokenizer_hash, weights_hash, write_json_atomic

COMPLETIONS_FORMAT_VERSION = 1
TRUNCATED_COLUMN = "completion_truncated"
_PREFIX = "teacher-completions-"
# The components of the key, in the order they are hashed and compared.
_KEY_COMPONENTS = (
    "format_version",
    "teacher_class",
    "weights_hash",
    "config_hash",
    "tokenizer_hash",
    "chat_template_hash",
    "prompts_hash",
    "num_rows",
    "chat_template_for_text",
    "generation",
)


@dataclass(frozen=True)
class TeacherCompletions:
    """The prompts with the teacher's completions (``dataset``), how many of them reached ``max_new_tokens``
    without an end token (``num_truncated``), the cache key, whether it was read from the cache (``cached``)
    and the provenance recorded with it."""

    dataset: Dataset
    num_truncated: int
    key: str
    cached: bool
    provenance: dict[str, Any]


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's ``generation_config.eos_token_id``
    (an instruct model's end of turn), sorted, without repeats."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    ids |= set(config_eos if isinstance(config_eos, list) else [config_eos]) - {None}
    if not ids:
        raise InputError(
            "Neither the tokenizer nor the teacher's generation_config has an EOS token, so no completion could "
            "end: set tokenizer.eos_token."
        )
    return sorted(int(i) for i in ids)


def completions_key(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_input_ids: list[list[int]],
    *,
    generation: dict[str, Any],
    chat_template_for_text: bool,
) -> tuple[str, dict[str, Any]]:
    """The cache key (32 hex digits) and the components it hashes (stored in the provenance)."""
    template = tokenizer.chat_template
    components = {
        "format_version": COMPLETIONS_FORMAT_VERSION,
        "teacher_class": type(base_model(teacher)).__name__,
        "weights_hash": weights_hash(teacher),
        "config_hash": _config_hash(teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "prompts_hash": _sha256(prompt_input_ids),
        "num_rows": len(prompt_input_ids),
        "chat_template_for_text": chat_template_for_text,
        "generation": json.loads(json.dumps(generation, sort_keys=True)),
    }
    return _sha256(components)[:32], components


def completions_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """The ``save_to_disk`` folder and the provenance JSON of the completions cache with ``key``."""
    stem = Path(cache_dir) / f"{_PREFIX}{key}"
    return stem, stem.with_name(stem.name + ".json")


def _generate(
    teacher: PreTrainedModel,
    tokenized: Dataset,
    generator: Generator,
    *,
    pad_token_id: int,
    end_ids: list[int],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[list[int]], list[bool]]:
    """Each row's completion ids (before its first end token) and whether it was cut at ``max_new_tokens``.

    Rows go to the generator in batches of similar prompt length (fewer pad tokens), results in row order."""
    prompts = tokenized["prompt_input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    collate = InstructionDataCollator(pad_token_id)
    device = next(teacher.parameters()).device
    completions: list[list[int]] = [[] for _ in prompts]
    cut = [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([{"prompt_input_ids": prompts[i], "completion_input_ids": []} for i in rows])
        out = generator.generate(
            teacher,
            batch["prompt_input_ids"].to(device),
            batch["prompt_attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        for j, i in enumerate(rows):
            ids = out.completion_ids[j][out.completion_mask[j].bool()].tolist()
            ended = bool(ids) and ids[-1] in end_ids
            completions[i] = ids[:-1] if ended else ids
            cut[i] = not ended
    return completions, cut


def _with_completions(prompts: Dataset, texts: list[str], cut: list[bool]) -> Dataset:
    rows = prompts.to_list()
    for row, text, truncated in zip(rows, texts, cut, strict=True):
        if row.get("messages") is not None:
            row["messages"] = [*row["messages"], {"role": "assistant", "content": text}]
        else:
            row["completion"] = text
        row[TRUNCATED_COLUMN] = truncated
    return Dataset.from_list(rows)


def _read_cache(
    folder: Path, provenance_file: Path, components: dict[str, Any]
) -> tuple[Dataset, dict] | None:
    if not (provenance_file.is_file() and folder.is_dir()):
        return None
    provenance = json.loads(provenance_file.read_text())
    mismatch = [
        f"{k}: cache has {provenance.get(k)!r}, asked for {v!r}"
        for k, v in components.items()
        if provenance.get(k) != v
    ]
    if mismatch:
        raise InputError(
            f"The teacher-completions cache {folder} does not match what was asked ({'; '.join(mismatch)}): delete "
            "it to generate the completions again."
        )
    dataset = load_from_disk(str(folder))
    if len(dataset) != components["num_rows"]:
        raise InputError(
            f"The teacher-completions cache {folder} holds {len(dataset)} rows, its provenance "
            f"{components['num_rows']}: delete it to generate the completions again."
        )
    return dataset, provenance


def teacher_completions(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset,
    *,
    max_new_tokens: int,
    cache_dir: str | os.PathLike | None,
    generator: Generator | None = None,
    batch_size: int = 8,
    chat_template_for_text: bool = False,
    teacher_name: str | None = None,
) -> TeacherCompletions:
    """The teacher's greedy completions of ``prompts`` (rows without completions), from the cache when it holds
    them, else generated and cached (see the module docstring).

    Args:
        teacher: a causal LM, on the device it should generate on, in eval mode.
        tokenizer: the tokenizer of training (its chat template renders the prompts).
        prompts: rows of ``messages`` (no final assistant turn) or ``prompt`` (no ``completion``).
        max_new_tokens: the longest completion; one that reaches it without an end token is counted.
        cache_dir: where the cache lives; None computes in memory, uncached.
        generator: default ``TransformersGenerator(pad, end ids)``, the end ids from :func:`end_token_ids`.
        batch_size: prompts per generation call.
        chat_template_for_text: render string prompts as one user turn through the chat template.
        teacher_name: the teacher's id or path for the provenance (default its config's ``_name_or_path``).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be >= 1.")
    already = [i for i, row in enumerate(prompts) if has_completion(row)]
    if already:
        raise InputError(
            f"{len(already)} of the {len(prompts)} prompts (rows {already[:5]}...) already have a completion: the "
            "teacher completes prompts alone. Drop the completions (or the final assistant turns), or train on them "
            "as they are."
        )
    pad_token_id = pad_token_id_of(tokenizer)
    end_ids = end_token_ids(teacher, tokenizer)
    generator = generator or TransformersGenerator(pad_token_id=pad_token_id, eos_token_id=end_ids)
    tokenized, _ = tokenize_instruction_dataset(
        prompts, tokenizer, 2**62, 0, chat_template_for_text=chat_template_for_text
    )
    generation = {
        "generator": type(generator).__name__,
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "end_token_ids": end_ids,
        "pad_token_id": pad_token_id,
        "batch_size": batch_size,
    }
    key, components = completions_key(
        teacher,
        tokenizer,
        tokenized["prompt_input_ids"],
        generation=generation,
        chat_template_for_text=chat_template_for_text,
    )
    folder, provenance_file = completions_paths(cache_dir, key) if cache_dir is not None else (None, None)
    with PartialState().main_process_first():
        if folder is not None and (found := _read_cache(folder, provenance_file, components)) is not None:
            dataset, provenance = found
            return TeacherCompletions(dataset, provenance["num_truncated"], key, True, provenance)
        was_training = teacher.training
        teacher.eval()
        try:
            ids, cut = _generate(
                teacher,
                tokenized,
                generator,
                pad_token_id=pad_token_id,
                end_ids=end_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
        finally:
            teacher.train(was_training)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        dataset = _with_completions(prompts, texts, cut)
        provenance = {
            **components,
            "key": key,
            "teacher": teacher_name or base_model(teacher).config._name_or_path,
            "num_truncated": sum(cut),
            "completion_tokens": sum(len(i) for i in ids),
            "device": str(next(teacher.parameters()).device),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {p: version(p) for p in ("torch", "transformers", "datasets")},
        }
        if folder is not None and PartialState().is_main_process:
            folder.parent.mkdir(parents=True, exist_ok=True)
            partial = folder.with_name(folder.name + f".partial{os.getpid()}")
            shutil.rmtree(partial, ignore_errors=True)
            dataset.save_to_disk(str(partial))
            shutil.rmtree(folder, ignore_errors=True)  # a folder left without its provenance by a killed run
            os.replace(partial, folder)
            write_json_atomic(provenance_file, provenance)
            dataset = load_from_disk(str(folder))
        return TeacherCompletions(dataset, sum(cut), key, False, provenance)
