"""Columnar batching of the teacher cache: padding, order, batches, and outputs equal to the per-row path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import random_classification_dataset
from test_teacher_cache import TEACHERS

from hf_distill.ragged import BatchLayout, batch_bounds, flat_lists, lists_of_fixed_size_lists, longest_first
from hf_distill.tasks import output_logits
from hf_distill.teacher_cache import length_sorted_batches, precompute_teacher_logits


def _rows(n: int, seed: int = 0, max_len: int = 9) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, rng.integers(1, max_len)).tolist() for _ in range(n)]


def test_flat_lists_of_a_sliced_chunked_column():
    rows = _rows(10)
    column = pa.chunked_array([pa.array(rows[:4]), pa.array(rows[4:])]).slice(2, 6)
    values, offsets = flat_lists(column)
    assert offsets[0] == 0 and len(offsets) == 7
    assert [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == rows[2:8]


def test_flat_lists_refuses_null_rows_and_non_lists():
    with pytest.raises(ValueError, match="null"):
        flat_lists(pa.array([[1, 2], None]))
    with pytest.raises(ValueError, match="token lists"):
        flat_lists(pa.array([1, 2]))


def test_padded_batch_holds_each_row_then_padding():
    rows = _rows(12, seed=1)
    values, offsets = flat_lists(pa.array(rows))
    picked = np.array([7, 0, 3, 11])
    layout = BatchLayout.of(offsets, picked)
    padded, mask = layout.pad(values, -1), layout.mask()
    width = max(len(rows[i]) for i in picked)
    assert padded.shape == mask.shape == (4, width)
    for j, i in enumerate(picked):
        n = len(rows[i])
        assert padded[j, :n].tolist() == rows[i] and (padded[j, n:] == -1).all()
        assert mask[j].tolist() == [1] * n + [0] * (width - n)
    assert layout.pad(values, 0, width=width + 3).shape == (4, width + 3)
    # Per-token results written back through `flat` land on their own tokens.
    back = np.zeros_like(values)
    back[layout.flat] = padded[layout.token_row, layout.token_col]
    for i in picked:
        assert back[offsets[i] : offsets[i + 1]].tolist() == rows[i]


def _greedy_batches(lengths, max_batch_tokens, max_batch_size):
    """The per-row greedy grouping the cache used before (the reference)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = []
    for i in order:
        if batches:
            current = batches[-1]
            if len(current) < max_batch_size and (len(current) + 1) * lengths[current[0]] <= max_batch_tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches


@pytest.mark.parametrize(("budget", "size"), [(1, 512), (20, 3), (64, 512), (1000, 7), (10**6, 10**6)])
def test_batches_are_the_greedy_length_sorted_ones(budget, size):
    lengths = [len(r) for r in _rows(200, seed=2, max_len=40)]
    assert length_sorted_batches(lengths, budget, size) == _greedy_batches(lengths, budget, size)
    order = longest_first(np.array(lengths))
    bounds = batch_bounds(np.array(lengths)[order], budget, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def test_lists_of_fixed_size_lists_round_trip():
    values = np.arange(12, dtype=np.float16).reshape(6, 2)
    array = lists_of_fixed_size_lists(values, np.array([0, 1, 1, 6]))
    assert array.to_pylist() == [[[0.0, 1.0]], [], [[2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]]


def _per_row_reference(teacher, dataset, task, dtype, top_k, budget, window):
    """The teacher cache's previous path: per-row tensors in, per-row arrays out (the reference)."""
    names = [n for n in ("attention_mask", "input_ids", "token_type_ids") if n in dataset.column_names]
    out = []
    for start in range(0, len(dataset), window):
        rows = dataset[start : start + window]
        lengths = [len(ids) for ids in rows["input_ids"]]
        results = [None] * len(lengths)
        for batch in length_sorted_batches(lengths, budget, 512):
            width = max(lengths[i] for i in batch)
            inputs = {}
            for name in names:
                padded = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in enumerate(batch):
                    padded[j, : lengths[i]] = torch.as_tensor(rows[name][i])
                inputs[name] = padded
            with torch.inference_mode():
                logits = output_logits(teacher(**inputs), task).float()
            if top_k:
                values, indices = logits.topk(top_k, dim=-1)
                for j, i in enumerate(batch):
                    n = lengths[i]
                    results[i] = (values[j, :n].numpy().astype(dtype), indices[j, :n].int().numpy())
            else:
                for j, i in enumerate(batch):
                    row = logits[j] if task == "sequence_classification" else logits[j, : lengths[i]]
                    results[i] = (row.numpy().astype(dtype),)
        out += results
    return out


@pytest.mark.parametrize("task", list(TEACHERS))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_outputs_equal_the_per_row_path_exactly(tmp_path, task, dtype):
    teacher, dataset = TEACHERS[task](), random_classification_dataset(23, seed=6)
    top_k = 5 if task in ("masked_lm", "causal_lm") else None
    out = precompute_teacher_logits(
        teacher, dataset, cache_dir=tmp_path, dtype=dtype, top_k=top_k, max_batch_tokens=30, sort_window=9
    )
    reference = _per_row_reference(teacher, dataset, task, dtype, top_k, budget=30, window=9)
    columns = ["teacher_topk_values", "teacher_topk_indices"] if top_k else ["teacher_logits"]
    leaf = out.data.column(columns[0]).type
    while pa.types.is_list(leaf) or pa.types.is_fixed_size_list(leaf):
        leaf = leaf.value_type
    assert leaf == pa.from_numpy_dtype(np.dtype(dtype))
    for name, ref in zip(columns, zip(*reference, strict=True), strict=True):
        for got, expected in zip(out[name], ref, strict=True):  # Python floats: exact float16/32 values
            got = np.array(got, dtype=expected.dtype)
            assert got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
