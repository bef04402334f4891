"""A text corpus as blocks of tokens: read from anywhere, split by document, checked, tokenized and packed.

:func:`load_corpus` reads ``dataset_name`` (a Hub id, a ``save_to_disk`` folder, text / CSV / JSON / JSON
Lines / Parquet files, or an ``offline:`` corpus) through :mod:`hf_distill.data`, keeps the training
split and a held-out ``validation`` split (carved from the training documents, seeded, when the data has
none), and checks the text column and that there is text at all. :func:`pack` tokenizes the documents,
joins them with the tokenizer's EOS token between documents, and cuts the stream into ``block_size``
blocks (the remainder shorter than a block is dropped), as the transformers ``run_clm`` example does.
Splitting by document before packing keeps every held-out token out of training.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..data import check_columns, read_dataset, select_splits
from ..errors import InputError
from . import offline


def train_and_validation(
    script, raw: DatasetDict, what: str
) -> tuple[DatasetDict, dict[str, dict[str, Any]]]:
    """The ``train`` and ``validation`` splits of ``raw`` as the script's split settings choose them (a seeded
    ``validation_size`` share of the ``what`` when there is no validation split), and their record."""
    splits, record = select_splits(
        raw,
        train_split=script.train_split,
        validation_split=script.validation_split,
        test_split="none",
        validation_size=script.validation_size,
        seed=script.dataset_seed,
        dataset_name=script.dataset_name,
    )
    if "validation" not in splits:
        raise InputError(
            f"{script.dataset_name} gives no held-out {what}: set validation_split to a split name, or "
            f"validation_size to a fraction of the {what} to hold out."
        )
    return splits, record


def load_corpus(script) -> tuple[DatasetDict, dict[str, dict[str, Any]]]:
    """``(splits, record)``: ``train`` and ``validation`` documents (and ``ood`` when asked), each a ``text``
    column; ``record`` says where each split came from (``results.json`` keeps it)."""
    splits, record = train_and_validation(
        script,
        read_dataset(
            offline.resolve_dataset_path(script.dataset_name, script.cache_dir), script.dataset_config_name
        ),
        "documents",
    )
    splits = DatasetDict(
        {name: _texts(split, script.text_column, script.dataset_name, name) for name, split in splits.items()}
    )
    if script.ood_dataset_name:
        ood_path = offline.resolve_dataset_path(script.ood_dataset_name, script.cache_dir)
        ood_raw = read_dataset(ood_path)
        first = next(iter(ood_raw))
        splits["ood"] = _texts(ood_raw[first], script.ood_text_column, script.ood_dataset_name, first)
        record["ood"] = {"source": f"{script.ood_dataset_name} ({first})", "rows": len(splits["ood"])}
    return splits, record


def _texts(dataset: Dataset, column: str, name: str, split: str) -> Dataset:
    """The non-empty documents of ``dataset[column]`` as a ``text`` column; refuses a corpus with no text."""
    check_columns(DatasetDict({split: dataset}), [column])
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    kept = dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(kept) == 0:
        raise InputError(
            f"The {split} split of {name} holds no text: its {len(dataset)} rows of {column!r} are empty or null. "
            "Point text_column at the column with the documents."
        )
    return kept


def check_block_size(block_size: int, config, who: str) -> None:
    """``block_size`` must fit the model's positions (``max_position_embeddings``, where the config has one)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise InputError(
            f"block_size={block_size} is beyond the {who}'s {limit} positions (max_position_embeddings): set "
            f"block_size to at most {limit}."
        )


def pack(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, *, max_blocks: int | None = None
) -> Dataset:
    """Documents tokenized, joined with EOS and cut into blocks: ``input_ids``, ``attention_mask``, ``labels``.

    Every document is followed by ``tokenizer.eos_token_id``; the stream is cut into consecutive
    ``block_size`` blocks and the last, shorter remainder dropped. ``labels`` equal ``input_ids`` (the
    model shifts them). ``max_blocks`` keeps the first blocks only. Deterministic, so the blocks'
    fingerprint (and every cache keyed by it) is the same on every run.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(
            "The tokenizer has no EOS token to separate documents: set tokenizer.eos_token, or use a causal LM's "
            "tokenizer."
        )

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [eos] for row in ids]}

    def group(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    # One group over the whole corpus (batch_size=None): no document is cut at a map-batch boundary.
    blocks = tokens.map(group, batched=True, batch_size=None, desc=f"Packing into blocks of {block_size}")
    if len(blocks) == 0:
        total = sum(len(r) for r in tokens["input_ids"])
        raise InputError(
            f"The text gives {total} tokens, fewer than one block of block_size={block_size}: lower block_size or "
            "give more text."
        )
    if max_blocks is not None and max_blocks < len(blocks):
        blocks = blocks.select(range(max_blocks))
    return blocks
