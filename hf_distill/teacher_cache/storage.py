"""The teacher cache's data file: its columns, its checks (size, sha256, rows, finiteness) and its size.

The teacher's outputs are stored as ``datasets`` Arrow columns (:func:`_features`); a data file is
opened only when its size, sha256 and row count agree with its provenance (:func:`_open_arrow`),
and its teacher columns hold no NaN, inf or null (:func:`check_finite_logits`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, List, Value
from torch import nn

from .. import tasks
from ..errors import InputError
from ..tasks import base_model
from .key import _CACHE_PREFIX, _key_of, _mismatch, index_dtype

logger = logging.getLogger(__name__)


def format_columns(
    teacher: nn.Module, task: str, dtype: str, top_k: int | None, sampling: Mapping[str, Any] | None
) -> dict[str, tuple[str, int]]:
    """The teacher columns of one cache format: name -> (stored dtype, values per token, or per example).

    Dense ``teacher_logits`` (classes, 2 for question answering, or the vocabulary); top-k
    ``teacher_topk_values`` + ``teacher_topk_indices`` (``k``); RS-KD ``teacher_sample_ids`` +
    ``teacher_sample_counts`` (``n`` draws; ``teacher_sample_weights``, importance weights, from a
    tempered proposal; no second column when the draws are stored themselves; ``teacher_sample_lengths``,
    uint8, each token's count, when a row's ``n L`` draws are allocated among its tokens and pooled), preceded, with an exact head of ``h`` tokens, by ``teacher_head_ids`` +
    ``teacher_head_probs`` (``h``; ``teacher_head_quanta``, uint8, with a quantized head).
    """
    config = base_model(teacher).config
    if task in tasks.VOCABULARY_TASKS:
        ids = index_dtype(config.vocab_size)
        if sampling:
            n, head = sampling["num_samples"], sampling.get("head", 0)
            quantized = sampling.get("head_quantized")
            probs, stored = ("teacher_head_quanta", "uint8") if quantized else ("teacher_head_probs", dtype)
            columns = {"teacher_head_ids": (ids, head), probs: (stored, head)} if head else {}
            if sampling.get("allocation", "even") != "even":  # pooled draws and each token's count
                return columns | {"teacher_sample_ids": (ids, n), "teacher_sample_lengths": ("uint8", 1)}
            if not sampling.get("counts", True):  # the draws themselves, 1/n each
                return columns | {"teacher_sample_ids": (ids, n)}
            if sampling.get("proposal_temperature", 1.0) != 1.0:  # importance weights, not counts
                return columns | {"teacher_sample_ids": (ids, n), "teacher_sample_weights": (dtype, n)}
            return columns | {"teacher_sample_ids": (ids, n), "teacher_sample_counts": ("uint8", n)}
        if top_k is not None:
            k = min(top_k, config.vocab_size)
            return {"teacher_topk_values": (dtype, k), "teacher_topk_indices": (ids, k)}
        return {"teacher_logits": (dtype, config.vocab_size)}
    return {"teacher_logits": (dtype, 2 if task == tasks.QUESTION_ANSWERING else config.num_labels)}


def stored_columns(columns: Mapping[str, tuple[str, int]]) -> dict[str, tuple[str, int | None]]:
    """The columns a cache stores for the drawn ``columns`` (:func:`format_columns`): the same, except that a
    row's pooled draws (with ``teacher_sample_lengths``) are stored as one code a row, ``teacher_sample_code``
    (uint8, of any length: width None; :mod:`hf_distill.draw_code`), which holds the head's ids too
    (``teacher_head_ids`` not stored; its probabilities are, each token's in the order of its ids)."""
    if "teacher_sample_lengths" not in columns:
        return dict(columns)
    return {("teacher_sample_code" if name == "teacher_sample_ids" else name):
            (("uint8", None) if name == "teacher_sample_ids" else spec)
            for name, spec in columns.items() if name != "teacher_head_ids"}  # fmt: skip


def _features(dataset: Dataset, task: str, columns: Mapping[str, tuple[str, int | None]]):
    """``dataset``'s features with the teacher ``columns`` (:func:`stored_columns`) added: per token a list of
    ``width`` values, or per example one list of any length (width None)."""
    features = dataset.features.copy()
    for name, (dtype, width) in columns.items():
        row = List(Value(dtype), length=-1 if width is None else width)
        features[name] = row if task == tasks.SEQUENCE_CLASSIFICATION or width is None else List(row)
    return features


# ---- integrity ------------------------------------------------------------------------------------

TEACHER_COLUMNS = ("teacher_logits", "teacher_topk_values", "teacher_head_probs", "teacher_sample_weights")


def _bad_rows(column: pa.ChunkedArray) -> np.ndarray:
    """Rows (table order) of a float or nested-list-of-float column holding NaN, inf or a null."""
    bad, offset = [], 0
    for chunk in column.chunks:
        rows = np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))
        values, parents = chunk, None
        while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
            if parents is not None:  # a null list inside a row (list_flatten would skip it)
                nulls = np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))
                rows = np.union1d(rows, parents[nulls])
            index = pc.list_parent_indices(values).to_numpy()
            parents = index if parents is None else parents[index]
            values = pc.list_flatten(values)
        numbers = values.to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(~np.isfinite(numbers.astype(np.float32, copy=False)))
        hits = parents[hits] if parents is not None else hits
        bad.append(np.union1d(rows, hits) + offset)
        offset += len(chunk)
    return np.unique(np.concatenate(bad)) if bad else np.zeros(0, dtype=np.int64)


def nonfinite_rows(dataset: Dataset) -> dict[str, list[int]]:
    """Teacher column -> rows of ``dataset`` (its own order) with NaN, inf or no value; empty if all finite.

    A vectorised scan of the Arrow columns (no Python loop over rows).
    """
    found = {}
    for name in TEACHER_COLUMNS:
        if name not in dataset.column_names:
            continue
        rows = _bad_rows(dataset.data.column(name))
        if dataset._indices is not None and len(rows):  # a shuffled or selected view: its own row numbers
            rows = np.flatnonzero(np.isin(dataset._indices.column(0).to_numpy(), rows))
        if len(rows):
            found[name] = rows.tolist()
    return found


def check_finite_logits(dataset: Dataset, *, where: str) -> None:
    """Raise ``ValueError`` naming the rows when ``dataset``'s teacher columns hold NaN, inf or nulls."""
    found = nonfinite_rows(dataset)
    if found:
        detail = "; ".join(f"{name}: {len(rows)} rows, e.g. {rows[:10]}" for name, rows in found.items())
        raise InputError(
            f"NaN, inf or missing values in {where} ({detail}). Cached teacher logits must be finite: recompute "
            "them with precompute_teacher_logits (dtype='float32' if float16 overflows), or drop those rows "
            "(dataset.select)."
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_arrow(arrow: Path, provenance: Mapping[str, Any], *, verify_hash: bool) -> Dataset:
    """The cache's data file, refused (``ValueError`` with the path) when truncated, garbled or short of rows."""
    size = arrow.stat().st_size
    if "arrow_bytes" in provenance and size != provenance["arrow_bytes"]:
        raise InputError(
            f"Teacher cache {arrow} has {size} bytes, its provenance says {provenance['arrow_bytes']}: the file "
            "was truncated or changed after it was written."
        )
    if verify_hash and "arrow_sha256" in provenance and _file_sha256(arrow) != provenance["arrow_sha256"]:
        raise InputError(
            f"Teacher cache {arrow} does not match the sha256 in its provenance: the file was garbled or "
            "changed after it was written."
        )
    try:
        dataset = Dataset.from_file(str(arrow))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InputError(f"Teacher cache {arrow} cannot be read: {type(err).__name__}: {err}") from None
    if len(dataset) != provenance.get("num_rows"):
        raise InputError(
            f"Teacher cache {arrow} has {len(dataset)} rows, its provenance says {provenance.get('num_rows')}."
        )
    return dataset


def _storage_size(dataset: Dataset, task: str) -> dict[str, float]:
    columns = [
        c
        for c in dataset.column_names
        if c.startswith("teacher_") and c.split("_")[1] in ("logits", "topk", "sample", "head")
    ]
    total = sum(dataset.data.column(c).nbytes for c in columns)
    size = {"teacher_bytes": total, "bytes_per_example": total / max(len(dataset), 1)}
    if task != tasks.SEQUENCE_CLASSIFICATION:
        per_token = [c for c in columns if c != "teacher_sample_code"]  # the code: one list a row
        tokens = pc.sum(pc.list_value_length(dataset.data.column(per_token[0]))).as_py()
        size["bytes_per_token"] = total / max(tokens, 1)
    return size


def _listed_shards(meta: Path, key: str, components: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The shards a provenance lists when it describes the cache with ``key``; None without a usable one.

    A provenance that parses but disagrees with the request it is filed under (another key, or
    components that do not hash to its key) raises ``ValueError`` naming what differs: which of
    the files is wrong cannot be told, so none is touched. An unreadable provenance is recomputed
    (with a warning). The shards' files are not read here (:func:`~.shards.compute_own_shards`
    checks each). A provenance written before shards existed lists its one file as one shard.
    """
    if not meta.exists():
        return None
    try:
        provenance = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("Teacher-cache provenance %s is not valid JSON: recomputing the cache.", meta)
        return None
    if not isinstance(provenance, dict):
        logger.warning("Teacher-cache provenance %s is not a JSON object: recomputing the cache.", meta)
        return None
    problems = _mismatch(provenance, {"key": key, **components})
    if provenance.get("key") == key and _key_of(provenance, components) != key and not problems:
        problems = [f"its components hash to {_key_of(provenance, components)}, not to its key {key}"]
    if problems:
        raise InputError(
            f"The teacher-cache provenance {meta} is filed under key {key} but does not describe that cache: "
            f"{'; '.join(problems)}. It was edited, or copied from another cache. Delete {meta} and its "
            f"{meta.stem}*.arrow files to recompute, or put the right provenance back."
        )
    return provenance_shards(provenance)


def provenance_shards(provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The shard files a provenance lists (``shards``), or the one file of a provenance without shards."""
    if "shards" in provenance:
        return [{**shard, "key": provenance["key"]} for shard in provenance["shards"]]
    return [
        {
            "file": f"{_CACHE_PREFIX}{provenance['key']}.arrow",
            "index": 0,
            "num_shards": 1,
            "start": 0,
            "key": provenance["key"],
            **{k: provenance[k] for k in ("num_rows", "arrow_bytes", "arrow_sha256") if k in provenance},
        }
    ]


def _describe_size(provenance: Mapping[str, Any]) -> str:
    text = (
        f"{provenance['teacher_bytes'] / 2**20:.2f} MiB, {provenance['bytes_per_example']:.0f} bytes/example"
    )
    if "bytes_per_token" in provenance:
        text += f", {provenance['bytes_per_token']:.0f} bytes/token"
    return text
