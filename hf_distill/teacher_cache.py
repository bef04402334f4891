"""Precomputed teacher logits: computed once into a ``datasets`` cache file, reused only when they match.

:func:`precompute_teacher_logits` runs the teacher once over a tokenized dataset and returns it with
the teacher's outputs as columns (the contract of :class:`hf_distill.DistillationTrainer`):

- ``teacher_logits``: sequence classification ``[C]``; token classification ``[L, C]``; question
  answering ``[L, 2]`` (start, end stacked on the last dim); masked/causal LM with ``top_k=None``
  (dense) ``[L, V]``.
- ``teacher_topk_values`` + ``teacher_topk_indices`` ``[L, k]``: masked and causal LM (the default,
  ``k = DEFAULT_TOP_K``): the ``k`` largest raw logits (``T = 1``) and their vocabulary ids.
  **Mass outside the top k**: :func:`hf_distill.losses.topk_kl_div_loss` renormalises the teacher
  over its top ``k`` (the mass outside is set to zero), while the student keeps its full softmax,
  so the KD term pulls the student's mass onto the teacher's top ``k`` tokens. With ``k`` at 20 to
  100 the dropped mass of a trained LM is small at ``T = 1``; higher temperatures flatten the
  teacher and make it larger, so raise ``k`` with ``T``.

``L`` is each example's own length (``len(input_ids)``): nothing is stored for padding. The
teacher sees the inputs as stored, so inputs that a collator changes at random each epoch (masked
LM's dynamic masking) do not go with cached logits: mask once before caching (static masking), or
run the teacher live.

The cache is a ``datasets`` cache file written by ``Dataset.map(new_fingerprint=key,
cache_file_name=...)``, which writes to a temporary file and renames it when complete, so an
interrupted run leaves no file under the cache name. Beside it a JSON provenance file
(:func:`read_provenance`) records the teacher, its weights hash, the dtype, ``top_k``, every key
component and the storage size; it is written after the arrow file, and a cache is used only when
both exist and agree. The key (:func:`teacher_cache_key`) hashes everything that changes the
stored values: the dataset's fingerprint, the teacher's weights (:func:`weights_hash`, not its
name), class and config, the tokenizer (:func:`tokenizer_hash`), the preprocessing settings, the
stored dtype, ``top_k`` and the autocast dtype. A different request has a different key, hence a
different file: it is recomputed, never answered from a stale cache. :func:`load_teacher_cache`
opens a cache made elsewhere and refuses it when its provenance differs from what is expected.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from datasets import Dataset, List, Value
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import tasks
from .collator import teacher_sources
from .ragged import (
    BatchLayout,
    batch_bounds,
    fixed_size_lists,
    flat_lists,
    lists_of_fixed_size_lists,
    longest_first,
)
from .tasks import base_model, forward_params, output_logits, task_of

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# Stored k for masked and causal LMs when ``top_k`` is not given.
DEFAULT_TOP_K = 64
STORAGE_DTYPES = ("float16", "float32")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Inputs the teacher may read, in the order they are looked up; ``teacher_`` columns (the teacher's
# own tokenization, sequence classification only) take precedence over the student's.
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Config entries that name or place a model without changing what it computes.
_CONFIG_NOT_HASHED = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_PROVENANCE_SUFFIX = ".json"
_CACHE_PREFIX = "teacher-logits-"


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict: for each entry in sorted key order, its name, dtype, shape and bytes.

    The same weights give the same hash whatever the model is called or where it was loaded from;
    any changed value, dtype or shape changes it. Raises ``ValueError`` for weights that are not
    materialised (meta tensors, e.g. a DeepSpeed ZeRO-3 shard): hash the full model instead.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_meta:
            raise ValueError(
                f"Cannot hash the teacher's weights: {name!r} is on the meta device. Load the full teacher "
                "(not a sharded or offloaded copy) to precompute its logits."
            )
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """sha256 of what in a tokenizer changes the ids the teacher sees, or None without a tokenizer.

    Covers its class, vocabulary (token -> id, added tokens included), special tokens,
    ``model_max_length``, ``padding_side`` and ``truncation_side``; not its name or path.
    """
    if tokenizer is None:
        return None
    return _sha256_json(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "model_max_length": tokenizer.model_max_length,
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
        }
    )


def _config_hash(model: nn.Module) -> str:
    config = base_model(model).config.to_dict()
    return _sha256_json({k: v for k, v in config.items() if k not in _CONFIG_NOT_HASHED})


def _teacher_columns(dataset: Dataset, teacher: nn.Module, task: str) -> dict[str, str]:
    """Teacher argument name -> dataset column it is read from."""
    columns = set(dataset.column_names)
    own = "teacher_input_ids" in columns
    if own and task != tasks.SEQUENCE_CLASSIFICATION:
        raise ValueError(
            f"The dataset has teacher_input_ids (a separate teacher tokenization) but the task is {task}: per-token "
            "teacher logits must line up with the student's tokens, so token-level tasks need one shared tokenizer. "
            "Drop the teacher_* columns and tokenize once with the teacher's tokenizer."
        )
    mapping = teacher_sources(columns, forward_params(teacher) & set(_INPUT_NAMES))
    if "input_ids" not in mapping:
        raise ValueError(
            f"precompute_teacher_logits needs a tokenized dataset with an input_ids column, got columns "
            f"{dataset.column_names}. Tokenize it first (dataset.map(tokenize, batched=True))."
        )
    return mapping


def _resolve_top_k(task: str, top_k: int | None) -> int | None:
    if task not in tasks.VOCABULARY_TASKS:
        if top_k is not None:
            raise ValueError(
                f"top_k={top_k} applies to masked and causal LMs (large vocabularies); a {task} teacher stores "
                "dense teacher_logits. Pass top_k=None."
            )
        return None
    if top_k is None:
        return DEFAULT_TOP_K
    if top_k < 0:  # -1: dense [L, V]
        return None
    if top_k == 0:
        raise ValueError("top_k must be >= 1 (or -1 for dense [L, V] logits), got 0.")
    return top_k


def teacher_cache_key(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    top_k: int | None = None,
    autocast_dtype: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key (32 hex digits) and the components it hashes (stored in the provenance).

    Arguments as in :func:`precompute_teacher_logits`.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES} (the stored precision), got {dtype!r}.")
    if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be None or one of {list(AUTOCAST_DTYPES)}, got {autocast_dtype!r}."
        )
    try:
        preprocessing = json.loads(json.dumps(dict(preprocessing or {}), sort_keys=True))
    except TypeError as err:
        raise TypeError(
            f"preprocessing must be JSON-serialisable settings (numbers, strings, lists): {err}"
        ) from None
    task = task_of(teacher)
    components = {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset_fingerprint": dataset._fingerprint,
        "num_rows": len(dataset),
        "teacher_class": type(base_model(teacher)).__name__,
        "task": task,
        "weights_hash": weights_hash(teacher),
        "config_hash": _config_hash(teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "preprocessing": preprocessing,
        "input_columns": _teacher_columns(dataset, teacher, task),
        "dtype": dtype,
        "top_k": _resolve_top_k(task, top_k),
        "autocast_dtype": autocast_dtype,
    }
    return _sha256_json(components)[:32], components


# The names of the components above, in order: load_teacher_cache rehashes them from a provenance.
_KEY_COMPONENTS = (
    "format_version",
    "dataset_fingerprint",
    "num_rows",
    "teacher_class",
    "task",
    "weights_hash",
    "config_hash",
    "tokenizer_hash",
    "preprocessing",
    "input_columns",
    "dtype",
    "top_k",
    "autocast_dtype",
)


# ---- inference ------------------------------------------------------------------------------------


def length_sorted_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Positions grouped into batches by length, longest first, so each batch pads little.

    A batch holds at most ``max_batch_size`` rows and at most ``max_batch_tokens`` padded tokens
    (rows times its longest row); a row longer than the budget forms a batch of its own. The
    batches :func:`precompute_teacher_logits` runs (:func:`hf_distill.ragged.batch_bounds`).
    """
    order = longest_first(np.asarray(lengths, dtype=np.int64))
    bounds = batch_bounds(np.asarray(lengths, dtype=np.int64)[order], max_batch_tokens, max_batch_size)
    return [order[start:stop].tolist() for start, stop in bounds]


def _output_width(teacher: nn.Module, task: str, top_k: int | None) -> int:
    """Values stored per example (sequence classification) or per token: classes, 2, vocabulary or k."""
    config = base_model(teacher).config
    if task in tasks.VOCABULARY_TASKS:
        return config.vocab_size if top_k is None else min(top_k, config.vocab_size)
    if task == tasks.QUESTION_ANSWERING:
        return 2
    return config.num_labels


class _TeacherLogits:
    """The ``Dataset.map`` function: teacher outputs for a window of examples, in their original order.

    It reads the window's token columns as Arrow list arrays and returns Arrow arrays, with no
    per-row Python: each batch is padded by one scatter (:class:`hf_distill.ragged.BatchLayout`),
    only the real tokens' outputs are gathered on the device (top-k taken there too), converted to
    the stored dtype and copied to the host once per batch. On CUDA the inputs go through pinned
    memory and the copy back is asynchronous, so the next batch is built while this one runs.
    """

    def __init__(
        self,
        teacher: nn.Module,
        task: str,
        columns: Mapping[str, str],
        *,
        pad_token_id: int,
        dtype: str,
        top_k: int | None,
        autocast_dtype: str | None,
        max_batch_tokens: int,
        max_batch_size: int,
    ):
        self.teacher, self.task, self.columns = teacher, task, dict(columns)
        self.pad_token_id, self.dtype, self.top_k = pad_token_id, np.dtype(dtype), top_k
        self.torch_dtype = getattr(torch, dtype)
        self.width = _output_width(teacher, task, top_k)
        self.autocast_dtype = AUTOCAST_DTYPES.get(autocast_dtype) if autocast_dtype else None
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.device = next(teacher.parameters()).device
        self.cuda = self.device.type == "cuda"

    def __call__(self, window: pa.Table) -> pa.Table:
        # Start each window from the budget that last fitted; halve it on out-of-memory (and only
        # then collect garbage and empty the device cache).
        flat = {name: flat_lists(window[column]) for name, column in self.columns.items()}
        ids = flat["input_ids"][1]  # columns with input_ids' row lengths share its offsets (and layouts)
        flat = {name: (v, ids if np.array_equal(o, ids) else o) for name, (v, o) in flat.items()}
        while True:
            try:
                outputs = self._window(flat)
                break
            except RuntimeError as err:
                if not should_reduce_batch_size(err):
                    raise
            clear_device_cache(garbage_collection=True)
            self._halve_budget()
        window = window.drop_columns([name for name in outputs if name in window.column_names])
        for name, values in outputs.items():
            window = window.append_column(name, values)
        return window

    def _halve_budget(self) -> int:
        self.max_batch_tokens //= 2
        if self.max_batch_tokens < 1:
            raise RuntimeError(
                "The teacher runs out of memory on a single example: it needs a bigger device."
            )
        logger.warning("Teacher ran out of memory; max_batch_tokens reduced to %d.", self.max_batch_tokens)
        return self.max_batch_tokens

    @torch.inference_mode()
    def _window(self, flat: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, pa.Array]:
        offsets = flat["input_ids"][1]
        lengths = np.diff(offsets)
        order = longest_first(lengths)
        out = self._allocate(len(lengths), int(offsets[-1]))
        pending = None
        for start, stop in batch_bounds(lengths[order], self.max_batch_tokens, self.max_batch_size):
            launched = self._launch(BatchLayout.of(offsets, order[start:stop]), flat)
            if pending is not None:  # the previous batch's copy back, while this one runs
                self._collect(pending, out)
            pending = launched
        if pending is not None:
            self._collect(pending, out)
        if self.task == tasks.SEQUENCE_CLASSIFICATION:
            return {key: fixed_size_lists(values) for key, values in out.items()}
        return {key: lists_of_fixed_size_lists(values, offsets) for key, values in out.items()}

    def _allocate(self, rows: int, tokens: int) -> dict[str, np.ndarray]:
        """The window's outputs in its original order: one row per example or per token."""
        n = rows if self.task == tasks.SEQUENCE_CLASSIFICATION else tokens
        if self.task in tasks.VOCABULARY_TASKS and self.top_k is not None:
            return {
                "teacher_topk_values": np.empty((n, self.width), self.dtype),
                "teacher_topk_indices": np.empty((n, self.width), np.int32),
            }
        return {"teacher_logits": np.empty((n, self.width), self.dtype)}

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def _launch(self, layout: BatchLayout, flat: dict[str, tuple[np.ndarray, np.ndarray]]):
        """Start one batch: inputs to the device, the forward, the outputs on their way to the host."""
        # Each column laid out by its own row lengths (normally those of input_ids), to one width.
        layouts = {
            name: layout if offsets is flat["input_ids"][1] else BatchLayout.of(offsets, layout.rows)
            for name, (_, offsets) in flat.items()
        }
        width = max(own.width for own in layouts.values())
        inputs = {}
        for name, (values, _) in flat.items():
            pad = self.pad_token_id if name == "input_ids" else 0
            inputs[name] = self._to_device(layouts[name].pad(values, pad, width))
        if "attention_mask" not in inputs:  # right padding: real tokens first
            inputs["attention_mask"] = self._to_device(layout.mask(width))
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            outputs = self.teacher(**inputs)
        logits = output_logits(outputs, self.task)
        if self.task != tasks.SEQUENCE_CLASSIFICATION:  # the real tokens only, (tokens, C)
            index = self._to_device(np.stack([layout.token_row, layout.token_col]))
            logits = logits[index[0], index[1]]
        logits = logits.float()
        if self.task in tasks.VOCABULARY_TASKS and self.top_k is not None:
            values, indices = logits.topk(self.width, dim=-1)
            results = {"teacher_topk_values": values, "teacher_topk_indices": indices.to(torch.int32)}
        else:
            values = logits
            results = {"teacher_logits": logits}
        # The largest magnitude stored, read only once the batch is back (float16 must hold it).
        peak = values.abs().amax() if self.dtype == np.float16 and values.numel() else None
        results = {key: value.to(self.torch_dtype) if value.is_floating_point() else value
                   for key, value in results.items()}  # fmt: skip
        host = {key: self._to_host(value) for key, value in results.items()}
        peak = self._to_host(peak) if peak is not None else None
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        return layout, host, peak, done

    def _collect(self, pending, out: dict[str, np.ndarray]) -> None:
        """Wait for a launched batch and write its outputs to their rows of the window."""
        layout, host, peak, done = pending
        if done is not None:
            done.synchronize()
        # NaN and inf pass here: the whole cache is scanned for them before it is marked complete.
        if peak is not None and _FLOAT16_MAX < float(peak) < float("inf"):
            raise ValueError(
                f"Teacher logits reach {float(peak):.3g}, beyond float16's range ({_FLOAT16_MAX:g}): "
                "pass dtype='float32'."
            )
        where = layout.rows if self.task == tasks.SEQUENCE_CLASSIFICATION else layout.flat
        for key, value in host.items():
            out[key][where] = value.numpy()


def _features(dataset: Dataset, teacher: nn.Module, task: str, dtype: str, top_k: int | None):
    features = dataset.features.copy()
    value, width = Value(dtype), _output_width(teacher, task, top_k)
    if task in tasks.VOCABULARY_TASKS and top_k is not None:
        features["teacher_topk_values"] = List(List(value, length=width))
        features["teacher_topk_indices"] = List(List(Value("int32"), length=width))
    elif task == tasks.SEQUENCE_CLASSIFICATION:
        features["teacher_logits"] = List(value, length=width)
    else:
        features["teacher_logits"] = List(List(value, length=width))
    return features


# ---- integrity ------------------------------------------------------------------------------------

TEACHER_COLUMNS = ("teacher_logits", "teacher_topk_values")


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
        raise ValueError(
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
        raise ValueError(
            f"Teacher cache {arrow} has {size} bytes, its provenance says {provenance['arrow_bytes']}: the file "
            "was truncated or changed after it was written."
        )
    if verify_hash and "arrow_sha256" in provenance and _file_sha256(arrow) != provenance["arrow_sha256"]:
        raise ValueError(
            f"Teacher cache {arrow} does not match the sha256 in its provenance: the file was garbled or "
            "changed after it was written."
        )
    try:
        dataset = Dataset.from_file(str(arrow))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ValueError(f"Teacher cache {arrow} cannot be read: {type(err).__name__}: {err}") from None
    if len(dataset) != provenance.get("num_rows"):
        raise ValueError(
            f"Teacher cache {arrow} has {len(dataset)} rows, its provenance says {provenance.get('num_rows')}."
        )
    return dataset


def _key_of(provenance: Mapping[str, Any], components: Mapping[str, Any]) -> str:
    """The key a provenance's own components hash to (the components named in ``components``)."""
    return _sha256_json({k: provenance.get(k) for k in components})[:32]


# ---- provenance -----------------------------------------------------------------------------------


def cache_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """The arrow file and the provenance JSON of the cache with ``key`` in ``cache_dir``."""
    stem = Path(cache_dir) / f"{_CACHE_PREFIX}{key}"
    return stem.with_suffix(".arrow"), stem.with_suffix(_PROVENANCE_SUFFIX)


def _storage_size(dataset: Dataset, task: str) -> dict[str, float]:
    columns = [c for c in dataset.column_names if c.startswith("teacher_") and ("logits" in c or "topk" in c)]
    total = sum(dataset.data.column(c).nbytes for c in columns)
    size = {"teacher_bytes": total, "bytes_per_example": total / max(len(dataset), 1)}
    if task != tasks.SEQUENCE_CLASSIFICATION:
        tokens = pc.sum(pc.list_value_length(dataset.data.column(columns[0]))).as_py()
        size["bytes_per_token"] = total / max(tokens, 1)
    return size


def _provenance_path(path: str | os.PathLike) -> Path:
    """The provenance JSON of a cache directory (holding exactly one cache) or of its .arrow/.json file."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"{_CACHE_PREFIX}*{_PROVENANCE_SUFFIX}"))
        if not found:
            raise FileNotFoundError(
                f"No complete teacher cache in {path} (no provenance file): it was never completed or is "
                "elsewhere. Run precompute_teacher_logits (or scripts/precompute_teacher_logits.py) to build it."
            )
        if len(found) > 1:
            raise ValueError(
                f"Expected exactly one teacher cache in {path}, found {len(found)} "
                f"({[p.name for p in found]}): pass the .json or .arrow file of the one you want."
            )
        return found[0]
    return path.with_suffix(_PROVENANCE_SUFFIX)


def read_provenance(cache: str | os.PathLike | Dataset) -> dict[str, Any]:
    """The provenance of a teacher cache: a directory holding one cache, its ``.arrow`` or ``.json`` file,
    or a dataset returned by :func:`precompute_teacher_logits` / :func:`load_teacher_cache`."""
    if isinstance(cache, Dataset):
        files = [
            f["filename"] for f in cache.cache_files if Path(f["filename"]).name.startswith(_CACHE_PREFIX)
        ]
        if not files:
            raise ValueError(
                "This dataset is not backed by a teacher cache file (it was computed in memory or transformed "
                "since): read the provenance from the cache directory instead."
            )
        cache = files[0]
    path = _provenance_path(cache)
    if not path.exists():
        raise FileNotFoundError(
            f"No teacher-cache provenance at {path}: the cache was never completed (or was made by something "
            "else). Run precompute_teacher_logits (or scripts/precompute_teacher_logits.py) to build it."
        )
    return json.loads(path.read_text())


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` through a temporary file and a rename: readers see all of it or nothing."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _complete(arrow: Path, meta: Path, key: str, components: Mapping[str, Any]) -> bool:
    """Whether a finished, readable cache with ``key`` is there: both files, the provenance naming the key.

    A provenance that parses but disagrees with the request it is filed under (another key, or
    components that do not hash to its key) raises ``ValueError`` naming what differs: which of
    the two files is wrong cannot be told, so neither is touched. An unreadable provenance, or a
    data file that is truncated or garbled, is recomputed (with a warning).
    """
    if not (arrow.exists() and meta.exists()):
        return False
    try:
        provenance = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.warning("Teacher-cache provenance %s is not valid JSON: recomputing the cache.", meta)
        return False
    if not isinstance(provenance, dict):
        logger.warning("Teacher-cache provenance %s is not a JSON object: recomputing the cache.", meta)
        return False
    problems = _mismatch(provenance, {"key": key, **components})
    if provenance.get("key") == key and _key_of(provenance, components) != key and not problems:
        problems = [f"its components hash to {_key_of(provenance, components)}, not to its key {key}"]
    if problems:
        raise ValueError(
            f"The teacher-cache provenance {meta} is filed under key {key} but does not describe that cache: "
            f"{'; '.join(problems)}. It was edited, or copied from another cache. Delete {meta} and {arrow} "
            "to recompute, or put the right provenance back."
        )
    try:
        _open_arrow(arrow, provenance, verify_hash=True)  # one read of the file: cheap beside the teacher
    except ValueError as err:
        logger.warning("%s Recomputing the cache.", err)
        return False
    return True


def _mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}: cache has {found.get(k)!r}, expected {v!r}" for k, v in expected.items() if found.get(k) != v
    ]


# ---- the two entry points -------------------------------------------------------------------------


def precompute_teacher_logits(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float16",
    top_k: int | None = None,
    autocast_dtype: str | None = None,
    max_batch_tokens: int = 16384,
    max_batch_size: int = 512,
    sort_window: int = 4096,
    teacher_name: str | None = None,
    expected_key: str | None = None,
) -> Dataset:
    """``dataset`` with the teacher's outputs added as columns, computed once and cached.

    Args:
        teacher: the teacher model, already on the device it should run on (``teacher.to("cuda")``).
        dataset: a tokenized dataset (``input_ids``, optionally ``attention_mask``/``token_type_ids``,
            or ``teacher_input_ids``... for a sequence classifier with its own tokenizer).
        tokenizer: the tokenizer of the teacher's inputs: its pad id is used and its hash is in the key.
        preprocessing: the settings used to tokenize ``dataset`` (e.g. ``{"max_length": 128,
            "truncation": True}``); JSON-serialisable, part of the key and of the provenance.
        cache_dir: where the cache lives. Default: beside ``dataset``'s own cache files; a dataset
            held only in memory without ``cache_dir`` is computed in memory, uncached.
        dtype: stored precision, ``"float16"`` (default; values beyond its range raise) or ``"float32"``.
        top_k: masked/causal LM only: store the ``k`` largest logits per token (default
            ``DEFAULT_TOP_K``; ``-1`` for dense ``[L, V]``). Must be None for other tasks.
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` to run the teacher under ``torch.autocast``.
        max_batch_tokens: padded tokens per forward pass (rows times longest row); halved on
            out-of-memory (the window is run again; garbage is collected and the device cache
            emptied then only) until a batch fits.
        max_batch_size: rows per forward pass at most.
        sort_window: examples sorted by length together (one ``Dataset.map`` batch); results are
            returned in the dataset's order.
        teacher_name: the teacher's id or path for the provenance (default: its config's ``_name_or_path``).
        expected_key: refuse (``ValueError``) unless the computed key equals this one.

    The CPU side is columnar (no per-row Python; see :class:`_TeacherLogits`), so on a GPU the
    teacher's forward sets the pace: around a teacher that costs nothing it reaches about 10^5
    examples/s on one CPU core (``benchmarks/bench_gpu.py``, the ceiling section).

    On several processes the main process computes and writes the cache first; the others then
    read it (``PartialState().main_process_first()``, so ``cache_dir`` must be visible to all).
    The returned dataset's provenance: :func:`read_provenance`.
    """
    task = task_of(teacher)
    key, components = teacher_cache_key(
        teacher,
        dataset,
        tokenizer=tokenizer,
        preprocessing=preprocessing,
        dtype=dtype,
        top_k=top_k,
        autocast_dtype=autocast_dtype,
    )
    if cache_dir is None and dataset.cache_files:
        cache_dir = Path(dataset.cache_files[0]["filename"]).parent
    if expected_key is not None and expected_key != key:
        detail = ""
        if cache_dir is not None and cache_paths(cache_dir, expected_key)[1].exists():
            old = read_provenance(cache_paths(cache_dir, expected_key)[1])
            detail = " Differences: " + "; ".join(_mismatch(old, components)) + "."
        raise ValueError(
            f"The teacher cache requested has key {key} but expected_key={expected_key}: the teacher, dataset, "
            f"tokenizer or storage settings differ from those the expected cache was built with.{detail} "
            "Drop expected_key to compute a new cache."
        )
    if max_batch_tokens < 1 or max_batch_size < 1 or sort_window < 1:
        raise ValueError(
            f"max_batch_tokens, max_batch_size and sort_window must be >= 1, got {max_batch_tokens}, "
            f"{max_batch_size}, {sort_window}."
        )
    columns = components["input_columns"]
    compute = _TeacherLogits(
        teacher,
        task,
        columns,
        pad_token_id=(tokenizer.pad_token_id if tokenizer is not None else None) or 0,
        dtype=dtype,
        top_k=components["top_k"],
        autocast_dtype=autocast_dtype,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
    )
    map_kwargs = dict(
        batched=True,
        batch_size=sort_window,
        features=_features(dataset, teacher, task, dtype, components["top_k"]),
        desc="Teacher logits",
    )
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        if cache_dir is None:
            logger.warning(
                "The dataset is held in memory and no cache_dir was given: teacher logits are computed in memory "
                "and not cached. Pass cache_dir to compute them once and reuse them."
            )
            out = _map(dataset, compute, key, keep_in_memory=True, **map_kwargs)
            check_finite_logits(out, where="the teacher's outputs")
            return out
        arrow, meta = cache_paths(cache_dir, key)
        with PartialState().main_process_first():
            hit = _complete(arrow, meta, key, components)
            if not hit:
                arrow.parent.mkdir(parents=True, exist_ok=True)
                meta.unlink(missing_ok=True)
            out = _map_to_file(dataset, compute, key, arrow, hit, map_kwargs)
            if not hit:
                _refuse_nonfinite(out, arrow)
                provenance = {
                    **components,
                    "key": key,
                    "teacher": teacher_name or base_model(teacher).config._name_or_path or None,
                    "columns": [c for c in out.column_names if c not in dataset.column_names],
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "versions": {"torch": torch.__version__, "datasets": version("datasets")},
                    "arrow_bytes": arrow.stat().st_size,
                    "arrow_sha256": _file_sha256(arrow),
                    **_storage_size(out, task),
                }
                write_json_atomic(meta, provenance)
                logger.info("Teacher cache written to %s (%s).", arrow, _describe_size(provenance))
            elif len(out) != components["num_rows"]:
                raise ValueError(
                    f"Teacher cache {arrow} has {len(out)} rows, expected {components['num_rows']}."
                )
        return out
    finally:
        teacher.train(teacher_was_training)


def _map(dataset: Dataset, compute: _TeacherLogits, key: str, **map_kwargs) -> Dataset:
    """``dataset.map(compute)`` on Arrow batches (no conversion to Python lists either way), returned
    in ``dataset``'s format with the new columns added and the fingerprint ``key``."""
    out = dataset.with_format("arrow").map(compute, new_fingerprint=key, **map_kwargs)
    fmt = dataset.format
    columns = fmt["columns"]
    if columns is not None:
        columns = columns + [c for c in out.column_names if c not in dataset.column_names]
    out = out.with_format(
        fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"]
    )
    out._fingerprint = key  # as map(new_fingerprint=key) leaves it: the format is not part of the key
    return out


def _map_to_file(
    dataset: Dataset, compute, key: str, arrow: Path, hit: bool, map_kwargs: dict[str, Any]
) -> Dataset:
    """:func:`_map` into ``arrow``; a full disk raises ``OSError(ENOSPC)`` saying that nothing was kept.

    ``datasets`` writes to a temporary file and renames it when complete, and removes it on error.
    """
    try:
        return _map(dataset, compute, key, cache_file_name=str(arrow), load_from_cache_file=hit, **map_kwargs)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing the teacher cache {arrow}: nothing was kept (no partial "
            f"cache is ever taken as complete). Free space on {arrow.parent} or pass a cache_dir on a bigger "
            "disk, then run again; dtype='float16' or a smaller top_k make the cache smaller.",
        ) from err


def _refuse_nonfinite(out: Dataset, arrow: Path) -> None:
    """Before a new cache is marked complete: NaN or inf from the teacher removes it and raises, naming rows."""
    try:
        check_finite_logits(out, where="the teacher's outputs")
    except ValueError as err:
        arrow.unlink(missing_ok=True)
        raise ValueError(f"{err} No cache was written (to {arrow}).") from None


def load_teacher_cache(
    path: str | os.PathLike,
    *,
    teacher: nn.Module | None = None,
    expected: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Dataset:
    """A cache built by :func:`precompute_teacher_logits` (e.g. on another machine), checked before use.

    ``path``: the cache directory (holding one cache), or its ``.arrow`` / ``.json`` file.
    ``teacher``: when given, its weights hash, class and config must match the cache's.
    ``expected``: provenance entries that must match exactly (e.g. ``{"dtype": "float16",
    "preprocessing": {"max_length": 128}}``); see :func:`read_provenance` for the keys.

    ``verify``: compare the data file's sha256 with the provenance's (reads the whole file once);
    its size and row count are always checked, and its teacher columns scanned for NaN and inf.

    Raises ``ValueError`` naming each mismatch, a provenance that does not describe the file it is
    filed beside, or a truncated, garbled or non-finite data file (with its path);
    ``FileNotFoundError`` for an incomplete cache.
    """
    provenance = read_provenance(path)
    if provenance.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(
            f"Teacher cache format {provenance.get('format_version')} but this hf-distill reads format "
            f"{CACHE_FORMAT_VERSION}: rebuild the cache with scripts/precompute_teacher_logits.py."
        )
    want = dict(expected or {})
    if teacher is not None:
        want.update(
            weights_hash=weights_hash(teacher),
            teacher_class=type(base_model(teacher)).__name__,
            config_hash=_config_hash(teacher),
        )
    problems = _mismatch(provenance, want)
    if problems:
        raise ValueError(
            f"The teacher cache at {path} does not match what was asked for: {'; '.join(problems)}. "
            "Rebuild it with the intended teacher and settings (scripts/precompute_teacher_logits.py)."
        )
    meta = _provenance_path(path)
    filed_under = meta.stem.removeprefix(_CACHE_PREFIX)
    components = {k: provenance.get(k) for k in _KEY_COMPONENTS}
    if provenance.get("key") != filed_under or _key_of(provenance, components) != filed_under:
        raise ValueError(
            f"The teacher-cache provenance {meta} is filed under key {filed_under} but says key "
            f"{provenance.get('key')!r} and its components hash to {_key_of(provenance, components)}: it was "
            "edited, or copied from another cache, so what it describes cannot be trusted. Rebuild the cache "
            "(scripts/precompute_teacher_logits.py) or put the right provenance back."
        )
    arrow, _ = cache_paths(meta.parent, filed_under)
    if not arrow.exists():
        raise FileNotFoundError(
            f"The teacher cache's provenance is there but its data file {arrow} is missing."
        )
    dataset = _open_arrow(arrow, provenance, verify_hash=verify)
    check_finite_logits(dataset, where=f"the teacher cache {arrow}")
    return dataset


def _describe_size(provenance: Mapping[str, Any]) -> str:
    text = (
        f"{provenance['teacher_bytes'] / 2**20:.2f} MiB, {provenance['bytes_per_example']:.0f} bytes/example"
    )
    if "bytes_per_token" in provenance:
        text += f", {provenance['bytes_per_token']:.0f} bytes/token"
    return text
