"""Teacher-logit cache: stored values, cache hits and misses, interrupted runs, and training equivalence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    VOCAB,
    ForwardCounter,
    config,
    load_module,
    random_classification_dataset,
    tiny_bert,
    tiny_bert_config,
)
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_distill import DistillationTrainer
from hf_distill.errors import InputError
from hf_distill.teacher_cache import (
    DEFAULT_TOP_K,
    cache_paths,
    length_sorted_batches,
    load_teacher_cache,
    precompute_teacher_caches,
    precompute_teacher_logits,
    read_provenance,
    teacher_cache_key,
    weights_hash,
)
from hf_distill.teacher_cache import precompute as precompute_module
from hf_distill.teacher_cache.precompute import default_batch_tokens

TESTS = Path(__file__).parent


def _bert(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(tiny_bert_config(**kwargs)).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=len(VOCAB), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config).eval()


TEACHERS = {
    "sequence_classification": lambda: tiny_bert(seed=1),
    "token_classification": lambda: _bert(BertForTokenClassification, 1, num_labels=4),
    "question_answering": lambda: _bert(BertForQuestionAnswering, 1, num_labels=2),
    "masked_lm": lambda: _bert(BertForMaskedLM, 1),
    "causal_lm": lambda: _gpt2(1),
}


def _one_by_one(teacher, dataset, task):
    """The teacher's outputs computed example by example, unpadded: the reference."""
    rows = []
    with torch.no_grad():
        for example in dataset:
            inputs = {
                k: torch.tensor([example[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")
            }
            out = teacher(**inputs)
            if task == "question_answering":
                rows.append(torch.stack([out.start_logits, out.end_logits], -1)[0])
            else:
                rows.append(out.logits[0])
    return rows


# ---- stored values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TEACHERS))
def test_stored_logits_are_the_teachers_in_dataset_order(tmp_path, task):
    teacher, dataset = TEACHERS[task](), random_classification_dataset(20, seed=3)
    # A small budget makes several length-sorted batches per window and several windows.
    out = precompute_teacher_logits(
        teacher, dataset, cache_dir=tmp_path, dtype="float32", max_batch_tokens=40, sort_window=7
    )
    reference = _one_by_one(teacher, dataset, task)
    assert out["input_ids"] == dataset["input_ids"]
    if task in ("masked_lm", "causal_lm"):
        assert set(out.column_names) - set(dataset.column_names) == {
            "teacher_topk_values",
            "teacher_topk_indices",
        }
        for row, ref in zip(out.with_format("torch"), reference, strict=True):
            values, indices = row["teacher_topk_values"], row["teacher_topk_indices"]
            assert values.shape == indices.shape == (len(row["input_ids"]), DEFAULT_TOP_K)
            top = ref.topk(DEFAULT_TOP_K, dim=-1)
            torch.testing.assert_close(values, top.values, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ref.gather(-1, indices.long()), values, rtol=1e-4, atol=1e-4)
    else:
        for row, ref in zip(out.with_format("torch"), reference, strict=True):
            torch.testing.assert_close(row["teacher_logits"], ref, rtol=1e-4, atol=1e-5)


def test_float16_storage_rounds_within_float16_precision(tmp_path):
    teacher, dataset = TEACHERS["token_classification"](), random_classification_dataset(10)
    out = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    assert out.features["teacher_logits"].feature.feature.dtype == "float16"
    for row, ref in zip(
        out.with_format("numpy"), _one_by_one(teacher, dataset, "token_classification"), strict=True
    ):
        np.testing.assert_allclose(
            row["teacher_logits"].astype(np.float32), ref.numpy(), rtol=1e-3, atol=1e-4
        )


def test_storage_size_is_reported(tmp_path):
    dataset = random_classification_dataset(10)
    seq = read_provenance(precompute_teacher_logits(tiny_bert(seed=1), dataset, cache_dir=tmp_path / "a"))
    assert seq["bytes_per_example"] >= 3 * 2  # three float16 logits (+ arrow offsets)
    mlm = read_provenance(
        precompute_teacher_logits(TEACHERS["masked_lm"](), dataset, cache_dir=tmp_path / "b", top_k=8)
    )
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    # float16 values + uint16 ids (the vocabulary fits in 16 bits), + each row's arrow offsets
    assert mlm["top_k"] == 8 and 8 * (2 + 2) <= mlm["bytes_per_token"] < 8 * (2 + 2) + 8
    assert mlm["teacher_bytes"] >= tokens * 8 * 4


def test_length_sorted_batches_cover_each_row_once_within_budget():
    lengths = [5, 17, 3, 9, 9, 30, 2, 11, 40, 6]
    batches = length_sorted_batches(lengths, max_batch_tokens=36, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 36
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < len(lengths) * max(lengths)  # less padding than padding everything to the longest


def test_out_of_memory_halves_the_batch_until_it_fits(tmp_path):
    teacher, dataset = TEACHERS["token_classification"](), random_classification_dataset(20, seed=3)
    sizes = []

    def small_device(module, args, kwargs):  # a device that holds 40 padded tokens per batch at most
        sizes.append(kwargs["input_ids"].numel())
        if kwargs["input_ids"].numel() > 40:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB.")

    teacher.register_forward_pre_hook(small_device, with_kwargs=True)
    out = precompute_teacher_logits(
        teacher, dataset, cache_dir=tmp_path, dtype="float32", max_batch_tokens=1024
    )
    assert sizes[0] > 40 and max(sizes[-5:]) <= 40  # failed first, then ran in smaller batches
    for row, ref in zip(
        out.with_format("torch"), _one_by_one(teacher, dataset, "token_classification"), strict=True
    ):
        torch.testing.assert_close(row["teacher_logits"], ref, rtol=1e-4, atol=1e-5)


def test_the_default_batch_keeps_one_forwards_float32_logits_within_1_gib():
    assert default_batch_tokens(49_152) == 5_461 and 5_461 * 49_152 * 4 <= 2**30 < 5_462 * 49_152 * 4
    assert default_batch_tokens(2) == 16_384  # a classifier: the cap
    assert default_batch_tokens(2**24) == 256  # beyond 2**20 outputs: the floor
    with pytest.raises(ValueError, match="num_outputs must be >= 1, got 0"):
        default_batch_tokens(0)


def test_precompute_without_max_batch_tokens_sizes_its_forwards_from_the_vocabulary(tmp_path, monkeypatch):
    teacher, dataset = TEACHERS["masked_lm"](), random_classification_dataset(20, seed=3)
    vocab = teacher.config.vocab_size
    monkeypatch.setattr(precompute_module, "MIN_BATCH_TOKENS", 1)
    monkeypatch.setattr(precompute_module, "LOGITS_BYTES", 4 * vocab * 24)  # room for 24 tokens' logits
    sizes = []
    teacher.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].numel()), with_kwargs=True
    )
    out = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, dtype="float32", top_k=-1)
    assert len(sizes) > 1 and max(sizes) <= 24 and sum(sizes) >= sum(map(len, dataset["input_ids"]))
    for row, ref in zip(out.with_format("torch"), _one_by_one(teacher, dataset, "masked_lm"), strict=True):
        torch.testing.assert_close(row["teacher_logits"], ref, rtol=1e-4, atol=1e-5)


# ---- several formats from one teacher pass --------------------------------------------------------

FORMATS = {
    "dense": {"top_k": -1},
    "topk": {"top_k": 8},
    "sampled": {"num_samples": 6, "sample_temperature": 1.5, "sample_seed": 3},
    "head": {"num_samples": 5, "sample_head": 2, "sample_seed": 3},
    "tempered": {"num_samples": 5, "sample_proposal_temperature": 2.0, "sample_seed": 3},
    "head, tempered": {"num_samples": 5, "sample_head": 1, "sample_proposal_temperature": 0.5},
    "head, draws": {"num_samples": 5, "sample_head": 2, "sample_seed": 3, "sample_counts": False},
    "head, systematic draws": {"num_samples": 5, "sample_head": 2, "sample_seed": 3, "sample_counts": False,
                               "sample_scheme": "systematic"},
    "head in 8 bits, draws": {"num_samples": 5, "sample_head": 2, "sample_seed": 3, "sample_counts": False,
                              "sample_head_quantized": True},
    "head in 8 bits, adaptive draws": {"num_samples": 5, "sample_head": 2, "sample_seed": 3, "sample_counts": False,
                                       "sample_head_quantized": True, "sample_allocation": "adaptive",
                                       "sample_scheme": "systematic"},
    "adaptive draws": {"num_samples": 5, "sample_seed": 3, "sample_counts": False, "sample_allocation": "adaptive"},
}
_SAME = ("key", "columns", "num_rows", "top_k", "sampling", "teacher_bytes", "bytes_per_token")


def _alone(teacher, dataset, folder, name, **kwargs):
    """``name``'s format computed by itself in ``folder``, and the teacher forwards that took."""
    counter = ForwardCounter(teacher)
    out = precompute_teacher_logits(teacher, dataset, cache_dir=folder, **FORMATS[name], **kwargs)
    return out, counter.calls


def test_one_teacher_pass_writes_every_format_as_each_alone_would(tmp_path):
    dataset = random_classification_dataset(20, seed=3)
    budget = {"max_batch_tokens": 40, "sort_window": 7}  # several batches per window, several windows
    teacher = _gpt2(1)
    counter = ForwardCounter(teacher)
    together = precompute_teacher_caches(teacher, dataset, FORMATS, cache_dir=tmp_path / "together", **budget)
    passes = counter.calls
    for name in FORMATS:
        alone, calls = _alone(_gpt2(1), dataset, tmp_path / name, name, **budget)
        assert calls == passes > 0  # six formats from the forwards of one
        assert together[name].column_names == alone.column_names
        for column in alone.column_names:
            assert together[name][column] == alone[column], (name, column)  # same computation: bitwise
        mine, theirs = read_provenance(together[name]), read_provenance(alone)
        assert {k: mine[k] for k in _SAME} == {k: theirs[k] for k in _SAME}
        # each format is its own cache: asked for alone afterwards, a hit
        again, calls = _alone(teacher, dataset, tmp_path / "together", name, **budget)
        assert calls == 0 and again[column] == alone[column]
    assert not list((tmp_path / "together").glob("*together*"))  # the scratch file is gone
    assert len(list((tmp_path / "together").glob("*.json"))) == len(FORMATS)


def test_one_pass_computes_only_the_formats_missing(tmp_path):
    dataset, teacher = random_classification_dataset(12, seed=4), _gpt2(1)
    first, calls = _alone(teacher, dataset, tmp_path, "topk")
    counter = ForwardCounter(teacher)
    both = precompute_teacher_caches(
        teacher, dataset, {k: FORMATS[k] for k in ("topk", "head")}, cache_dir=tmp_path
    )
    assert counter.calls == calls  # one pass, for the head format only
    assert read_provenance(both["topk"])["created"] == read_provenance(first)["created"]  # untouched
    assert both["topk"]["teacher_topk_values"] == first["teacher_topk_values"]
    assert set(both["head"].column_names) > {"teacher_head_ids", "teacher_head_probs", "teacher_sample_ids"}


def test_only_caches_an_older_reader_would_misread_are_format_3_to_8(tmp_path, monkeypatch):
    dataset, teacher = random_classification_dataset(8, seed=6), _gpt2(1)
    names = ("topk", "sampled", "head", "tempered", "head, draws", "head, systematic draws", "head in 8 bits, draws",
             "head in 8 bits, adaptive draws", "adaptive draws")
    out = precompute_teacher_caches(teacher, dataset, {k: FORMATS[k] for k in names}, cache_dir=tmp_path)
    versions = {name: read_provenance(out[name])["format_version"] for name in names}
    # plain caches keep their keys; systematic draws have the columns of iid ones; a head in 8 bits is format 4
    assert versions == {"topk": 2, "sampled": 2, "head": 3, "tempered": 3, "head, draws": 3,
                        "head, systematic draws": 3, "head in 8 bits, draws": 4,
                        "head in 8 bits, adaptive draws": 8, "adaptive draws": 7}  # fmt: skip
    for name in names:
        assert load_teacher_cache(cache_paths(tmp_path, read_provenance(out[name])["key"])[0]).num_rows == 8
    # a reader of format 2 only (hf-distill before exact heads) reads the plain caches and refuses the others
    monkeypatch.setattr(precompute_module, "READABLE_FORMAT_VERSIONS", (2,))
    load_teacher_cache(cache_paths(tmp_path, read_provenance(out["sampled"])["key"])[0])
    with pytest.raises(
        ValueError, match=r"^Teacher cache format 3 but this hf-distill reads formats 2: rebuild"
    ):
        load_teacher_cache(cache_paths(tmp_path, read_provenance(out["head"])["key"])[0])
    # a reader of formats 2 and 3 (before heads in 8 bits) refuses the head it would drop
    monkeypatch.setattr(precompute_module, "READABLE_FORMAT_VERSIONS", (2, 3))
    load_teacher_cache(cache_paths(tmp_path, read_provenance(out["head"])["key"])[0])
    with pytest.raises(ValueError, match=r"^Teacher cache format 4 but this hf-distill reads formats 2, 3: rebuild"):
        load_teacher_cache(cache_paths(tmp_path, read_provenance(out["head in 8 bits, draws"])["key"])[0])
    # a reader of formats 2 to 4 (before allocated draws) refuses pooled draws it would misread
    monkeypatch.setattr(precompute_module, "READABLE_FORMAT_VERSIONS", (2, 3, 4))
    load_teacher_cache(cache_paths(tmp_path, read_provenance(out["head in 8 bits, draws"])["key"])[0])
    with pytest.raises(ValueError, match=r"^Teacher cache format 7 but this hf-distill reads formats 2, 3, 4: rebuild"):
        load_teacher_cache(cache_paths(tmp_path, read_provenance(out["adaptive draws"])["key"])[0])
    # readers of formats 2 to 5 (pooled draws as uint16 ids) and 2 to 6 (a Rice code) refuse the interpolative code;
    # with those, 2 to 7 (head ids stored apart) refuse a head coded with the draws
    for readable in [(2, 3, 4, 5), (2, 3, 4, 5, 6), (2, 3, 4, 5, 6, 7)]:
        monkeypatch.setattr(precompute_module, "READABLE_FORMAT_VERSIONS", readable)
        if 7 in readable:
            load_teacher_cache(cache_paths(tmp_path, read_provenance(out["adaptive draws"])["key"])[0])
        else:
            with pytest.raises(ValueError, match=rf"^Teacher cache format 7 but this hf-distill reads formats {', '.join(map(str, readable))}: "):
                load_teacher_cache(cache_paths(tmp_path, read_provenance(out["adaptive draws"])["key"])[0])
        with pytest.raises(ValueError, match=rf"^Teacher cache format 8 but this hf-distill reads formats {', '.join(map(str, readable))}: "):
            load_teacher_cache(cache_paths(tmp_path, read_provenance(out["head in 8 bits, adaptive draws"])["key"])[0])


def test_one_pass_in_memory_equals_each_format_alone():
    dataset, teacher = random_classification_dataset(10, seed=5), _gpt2(1)
    counter = ForwardCounter(teacher)
    together = precompute_teacher_caches(teacher, dataset, FORMATS, max_batch_tokens=30)
    passes = counter.calls
    for name, spec in FORMATS.items():
        counter = ForwardCounter(teacher := _gpt2(1))
        alone = precompute_teacher_logits(teacher, dataset, max_batch_tokens=30, **spec)
        assert counter.calls == passes
        assert together[name].column_names == alone.column_names
        for column in alone.column_names:
            assert together[name][column] == alone[column], (name, column)


def test_bad_formats_are_refused_in_one_line(tmp_path):
    dataset, teacher = random_classification_dataset(4), _gpt2(1)
    with pytest.raises(ValueError, match=r"sets some of \['top_k'"):
        precompute_teacher_caches(teacher, dataset, {"a": {"k": 3}}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one format"):
        precompute_teacher_caches(teacher, dataset, {}, cache_dir=tmp_path)
    shapes = ({"sample_head": 2}, {"sample_proposal_temperature": 2.0}, {"sample_counts": False},
              {"sample_scheme": "systematic"}, {"sample_head_quantized": True},
              {"sample_allocation": "adaptive"})  # fmt: skip
    for shape in shapes:
        with pytest.raises(
            ValueError,
            match="sample_head_quantized and sample_allocation shape the RS-KD draws: they need num_samples",
        ):
            precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, **shape)
    for tau in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=rf"sample_proposal_temperature must be > 0 .*, got {tau}\."):
            precompute_teacher_logits(
                teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_proposal_temperature=tau
            )
    with pytest.raises(ValueError, match=r"num_samples must be between 1 and 255 .*, got 0\."):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=0)  # not a top-k cache
    vocab = len(VOCAB)
    for head in (-1, vocab):
        with pytest.raises(
            ValueError, match=rf"sample_head .* below the vocabulary size {vocab}, got {head}\."
        ):
            precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_head=head)
    assert not list(tmp_path.iterdir())


# ---- cache hits and misses --------------------------------------------------------------------------


def test_same_inputs_hit_the_cache_without_running_the_teacher(tmp_path, tokenizer):
    first_teacher = tiny_bert(seed=1)
    first = precompute_teacher_logits(
        first_teacher, random_classification_dataset(12), cache_dir=tmp_path, tokenizer=tokenizer
    )
    # Fresh objects with equal contents: same weights, same rows, same tokenizer settings.
    teacher = tiny_bert(seed=1)
    counter = ForwardCounter(teacher)
    second = precompute_teacher_logits(
        teacher, random_classification_dataset(12), cache_dir=tmp_path, tokenizer=tokenizer
    )
    assert counter.calls == 0
    assert second["teacher_logits"] == first["teacher_logits"]
    assert len(list(tmp_path.glob("*.arrow"))) == 1


def _change_weights(teacher):
    with torch.no_grad():
        teacher.classifier.bias[0] += 1e-3


@pytest.mark.parametrize(
    "change",
    ["teacher_weights", "tokenizer_max_length", "preprocessing_max_length", "dataset", "dtype", "autocast"],
)
def test_changed_inputs_miss_the_cache(tmp_path, tokenizer, change):
    dataset, teacher = random_classification_dataset(12), tiny_bert(seed=1)
    kwargs = dict(
        cache_dir=tmp_path, tokenizer=tokenizer, preprocessing={"max_length": 12, "truncation": True}
    )
    precompute_teacher_logits(teacher, dataset, **kwargs)
    if change == "teacher_weights":
        _change_weights(teacher)
    elif change == "tokenizer_max_length":
        tokenizer.model_max_length = 7
    elif change == "preprocessing_max_length":
        kwargs["preprocessing"] = {"max_length": 7, "truncation": True}
    elif change == "dataset":
        dataset = dataset.map(
            lambda row, i: {"input_ids": row["input_ids"][:-2] + [3]} if i == 0 else {}, with_indices=True
        )
    elif change == "dtype":
        kwargs["dtype"] = "float32"
    elif change == "autocast":
        kwargs["autocast_dtype"] = "bfloat16"
    counter = ForwardCounter(teacher)
    out = precompute_teacher_logits(teacher, dataset, **kwargs)
    assert counter.calls > 0
    assert len(list(tmp_path.glob("teacher-logits-*.arrow"))) == 2
    assert read_provenance(out)["weights_hash"] == weights_hash(teacher)


def test_key_ignores_the_teachers_name(tmp_path):
    dataset = random_classification_dataset(4)
    a, b = tiny_bert(seed=1), tiny_bert(seed=1)
    b.config._name_or_path = "somewhere/else"
    assert teacher_cache_key(a, dataset)[0] == teacher_cache_key(b, dataset)[0]
    assert teacher_cache_key(tiny_bert(seed=2), dataset)[0] != teacher_cache_key(a, dataset)[0]


def test_key_changes_with_top_k_and_with_the_teachers_config_at_equal_weights(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    dataset = random_classification_dataset(4).remove_columns("labels")

    def mlm(**kwargs):
        torch.manual_seed(1)
        return BertForMaskedLM(
            BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, **kwargs)
        )  # fmt: skip

    base = mlm()
    keys = {k: teacher_cache_key(base, dataset, top_k=k)[0] for k in (5, 8, -1)}
    assert len(set(keys.values())) == 3  # top 5, top 8, dense
    assert teacher_cache_key(mlm(), dataset, top_k=5)[0] == keys[5]  # same weights, same config
    # Same weights, a config that changes the logits (GELU vs ReLU): another key.
    other = mlm(hidden_act="relu")
    assert weights_hash(other) == weights_hash(base)
    assert teacher_cache_key(other, dataset, top_k=5)[0] != keys[5]


def test_expected_key_mismatch_is_refused_with_the_differences(tmp_path):
    dataset, teacher = random_classification_dataset(8), tiny_bert(seed=1)
    old = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    key = read_provenance(old)["key"]
    assert len(precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, expected_key=key)) == 8
    _change_weights(teacher)
    with pytest.raises(ValueError, match="weights_hash"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, expected_key=key)


# ---- interrupted runs -------------------------------------------------------------------------------


def test_failure_midway_leaves_no_cache_and_the_next_call_recomputes(tmp_path):
    dataset, teacher = random_classification_dataset(30), tiny_bert(seed=1)
    calls = []

    def fail_on_third_batch(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")

    hook = teacher.register_forward_hook(fail_on_third_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, max_batch_tokens=24, sort_window=8)
    hook.remove()
    assert not list(tmp_path.glob("teacher-logits-*"))
    counter = ForwardCounter(teacher)
    out = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, max_batch_tokens=24, sort_window=8)
    assert counter.calls > 0 and len(out) == 30 and None not in out["teacher_logits"]


_CHILD = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import random_classification_dataset, tiny_bert
from hf_distill.teacher_cache import precompute_teacher_logits

teacher, calls = tiny_bert(seed=1), []
def hook(module, args, output):
    calls.append(1)
    if {kill_after} and len(calls) == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler runs
teacher.register_forward_hook(hook)
precompute_teacher_logits(teacher, random_classification_dataset(30), cache_dir={cache!r},
                          max_batch_tokens=24, sort_window=8)
print("calls", len(calls))
"""


def _child(cache_dir, kill_after):
    code = textwrap.dedent(_CHILD).format(tests=str(TESTS), cache=str(cache_dir), kill_after=kill_after)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_killed_precompute_is_not_taken_as_complete_and_a_finished_one_survives_the_process(tmp_path):
    killed = _child(tmp_path, kill_after=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    key = teacher_cache_key(tiny_bert(seed=1), random_classification_dataset(30))[0]
    arrow, meta = cache_paths(tmp_path, key)
    assert not arrow.exists() and not meta.exists()

    done = _child(tmp_path, kill_after=0)  # a new process completes the cache
    assert done.returncode == 0 and "calls 0" not in done.stdout, done.stderr
    assert arrow.exists() and meta.exists()

    teacher = tiny_bert(seed=1)  # this process reuses it without running the teacher
    counter = ForwardCounter(teacher)
    out = precompute_teacher_logits(teacher, random_classification_dataset(30), cache_dir=tmp_path)
    assert counter.calls == 0 and len(out) == 30


# ---- loading a cache made elsewhere -----------------------------------------------------------------


def test_load_teacher_cache_checks_provenance(tmp_path):
    dataset, teacher = random_classification_dataset(8), tiny_bert(seed=1)
    made = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, preprocessing={"max_length": 12})
    loaded = load_teacher_cache(tmp_path, teacher=teacher, expected={"dtype": "float16"})
    assert loaded["teacher_logits"] == made["teacher_logits"]
    assert read_provenance(tmp_path)["teacher_class"] == "BertForSequenceClassification"
    with pytest.raises(ValueError, match="weights_hash"):
        load_teacher_cache(tmp_path, teacher=tiny_bert(seed=2))
    with pytest.raises(ValueError, match="preprocessing"):
        load_teacher_cache(tmp_path, expected={"preprocessing": {"max_length": 64}})
    next(tmp_path.glob("*.json")).unlink()  # provenance gone: not a complete cache
    with pytest.raises(FileNotFoundError, match="never completed"):
        load_teacher_cache(tmp_path)


def test_arrow_file_without_provenance_is_recomputed(tmp_path):
    dataset, teacher = random_classification_dataset(8), tiny_bert(seed=1)
    precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    next(tmp_path.glob("*.json")).unlink()
    counter = ForwardCounter(teacher)
    precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    assert counter.calls > 0 and len(list(tmp_path.glob("*.json"))) == 1


# ---- bad requests -----------------------------------------------------------------------------------


def test_bad_requests_raise(tmp_path):
    dataset = random_classification_dataset(4)
    with pytest.raises(ValueError, match="top_k"):
        precompute_teacher_logits(tiny_bert(), dataset, cache_dir=tmp_path, top_k=5)
    with pytest.raises(ValueError, match="dtype"):
        precompute_teacher_logits(tiny_bert(), dataset, cache_dir=tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="input_ids"):
        precompute_teacher_logits(tiny_bert(), dataset.remove_columns("input_ids"), cache_dir=tmp_path)
    own = dataset.add_column("teacher_input_ids", dataset["input_ids"])
    with pytest.raises(ValueError, match="token-level"):
        precompute_teacher_logits(TEACHERS["token_classification"](), own, cache_dir=tmp_path)


def test_logits_beyond_float16_range_raise(tmp_path):
    teacher = tiny_bert(seed=1)
    with torch.no_grad():
        teacher.classifier.bias.fill_(1e6)
    with pytest.raises(ValueError, match="float32"):
        precompute_teacher_logits(teacher, random_classification_dataset(4), cache_dir=tmp_path)


def test_in_memory_dataset_without_cache_dir_is_computed_uncached(tmp_path):
    out = precompute_teacher_logits(tiny_bert(seed=1), random_classification_dataset(4))
    assert len(out["teacher_logits"]) == 4 and not out.cache_files


# ---- training with cached logits equals training with the live teacher ------------------------------


def _train(tmp_path, task, teacher, dataset, tokenizer):
    """Train a fresh student (same seed every time) for 2 epochs of SGD; its loss curve and final weights."""
    if task == "sequence_classification":
        student = tiny_bert(seed=2)
    else:
        student = _bert(BertForTokenClassification, 2, num_labels=4).train()
    args = config(
        tmp_path,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        optim="sgd",
        learning_rate=0.5,
        temperature=2.0,
        alpha=0.8,
        beta=0.2,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _token_dataset(n=16):
    base = random_classification_dataset(n, seed=5)
    g = torch.Generator().manual_seed(5)
    labels = [torch.randint(0, 4, (len(ids),), generator=g).tolist() for ids in base["input_ids"]]
    return base.remove_columns("labels").add_column("labels", labels)


@pytest.mark.parametrize(
    ("task", "dtype", "tolerance"),
    [
        # float32 storage: the same numbers up to batching noise (the teacher runs in other batches and
        # paddings when precomputing, so its logits may differ in the last bits on another BLAS; SGD carries
        # such differences through linearly, where Adam's g / (|g| + eps) would magnify them).
        ("sequence_classification", "float32", 1e-5),
        ("token_classification", "float32", 1e-5),
        # float16 storage: logits rounded to ~3 significant digits (measured: weights within 5e-4).
        ("sequence_classification", "float16", 2e-3),
        ("token_classification", "float16", 2e-3),
    ],
)
def test_cached_teacher_trains_like_the_live_teacher(tmp_path, tokenizer, task, dtype, tolerance):
    teacher = TEACHERS[task]()
    dataset = (
        random_classification_dataset(16, seed=5) if task == "sequence_classification" else _token_dataset()
    )
    live_losses, live_weights = _train(tmp_path / "live", task, teacher, dataset, tokenizer)
    cached = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path / "cache", dtype=dtype)
    counter = ForwardCounter(teacher)
    cached_losses, cached_weights = _train(tmp_path / "cached", task, None, cached, tokenizer)
    assert counter.calls == 0
    assert len(cached_losses) == len(live_losses) == 8
    np.testing.assert_allclose(cached_losses, live_losses, rtol=tolerance, atol=tolerance)
    for name, value in live_weights.items():
        torch.testing.assert_close(cached_weights[name], value, rtol=tolerance, atol=tolerance)
    if dtype == "float16":  # the rounding is visible, so the test would notice a float32 cache
        assert any(not torch.equal(cached_weights[n], v) for n, v in live_weights.items())


# ---- the script -------------------------------------------------------------------------------------


def _script():
    return load_module("scripts/precompute_teacher_logits.py")


def test_script_fills_a_cache_that_training_loads(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    random_classification_dataset(12).save_to_disk(str(tmp_path / "data"))
    argv = [
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--dataset_path", str(tmp_path / "data"),
        "--logits_dir", str(tmp_path / "logits"),
    ]  # fmt: skip
    [path] = _script().main(argv)
    written = path.stat().st_mtime_ns
    assert _script().main(argv) == [path] and path.stat().st_mtime_ns == written  # second run: a cache hit
    cached = load_teacher_cache(
        tmp_path / "logits", teacher=teacher, expected={"teacher": str(tmp_path / "teacher")}
    )
    assert len(cached) == 12 and cached.features["teacher_logits"].feature.dtype == "float16"


@pytest.mark.slow
def test_script_fills_the_cache_that_distill_glue_reads(tmp_path, capsys):
    from offline_fixtures import fake_wheels
    from test_distill_glue import distill_glue, tiny_flags

    cache = fake_wheels(tmp_path / "cache")
    flags = tiny_flags(cache, tmp_path / "out")
    [path] = _script().main(flags)  # stage 1 (teacher fine-tuning) and the logits
    written = path.stat().st_mtime_ns
    distill_glue.main([*flags, "--train_baseline", "false"])
    assert "reusing the fine-tuned teacher" in capsys.readouterr().out
    assert list((cache / "teacher_logits").glob("*.json")) == [path]  # the same key: no second cache
    assert path.stat().st_mtime_ns == written


def test_draws_without_counts_hold_the_same_draws_in_fewer_bytes(tmp_path):
    """``sample_counts=False`` stores each draw's id (repeats included) and no counts: the same draws as the
    counted cache of the same seed, read back as the same target, at 2 bytes a draw instead of 3 a slot."""
    dataset, teacher = random_classification_dataset(10, seed=7), _gpt2(1)
    spec = {"num_samples": 6, "sample_head": 2, "sample_seed": 3}
    out = precompute_teacher_caches(
        teacher, dataset, {"counted": spec, "draws": {**spec, "sample_counts": False}}, cache_dir=tmp_path
    )
    counted, draws = out["counted"], out["draws"]
    assert "teacher_sample_counts" not in draws.column_names
    assert read_provenance(draws)["sampling"]["counts"] is False
    assert read_provenance(draws)["key"] != read_provenance(counted)["key"]
    assert "counts" not in read_provenance(counted)["sampling"]  # the default stays out of the key
    assert draws["teacher_head_probs"] == counted["teacher_head_probs"]
    for row_draws, row_ids, row_counts in zip(
        draws["teacher_sample_ids"],
        counted["teacher_sample_ids"],
        counted["teacher_sample_counts"],
        strict=True,
    ):
        for token_draws, ids, counts in zip(row_draws, row_ids, row_counts, strict=True):
            assert token_draws == sorted(token_draws)
            assert token_draws == [i for i, c in zip(ids, counts, strict=True) for _ in range(c)]
    # per token: head 2 x (2 + 2) bytes, then 6 draws x 2 bytes against 6 slots x (2 + 1) bytes
    tokens = sum(len(row) for row in draws["teacher_sample_ids"])
    saved = read_provenance(counted)["teacher_bytes"] - read_provenance(draws)["teacher_bytes"]
    assert saved == 6 * tokens + 4 * len(draws)  # the counts and their list offsets
    with pytest.raises(
        ValueError, match=r"sample_counts=False stores the draws themselves .* importance weights"
    ):
        precompute_teacher_logits(
            teacher,
            dataset,
            cache_dir=tmp_path,
            num_samples=4,
            sample_proposal_temperature=2.0,
            sample_counts=False,
        )


def test_systematic_draws_are_their_own_cache_and_stay_within_one_of_n_p(tmp_path):
    """``sample_scheme="systematic"``: the scheme is in the key and the provenance (an iid cache is never read as a
    systematic one, nor the other way), the columns and bytes are those of iid draws, each token is drawn
    ``floor(n p)`` or ``ceil(n p)`` times, and a scheme that does not exist is refused in one line."""
    dataset, teacher = random_classification_dataset(6, seed=5), _gpt2(1)
    spec = {"num_samples": 8, "sample_seed": 3}
    out = precompute_teacher_caches(
        teacher, dataset, {"iid": spec, "sys": {**spec, "sample_scheme": "systematic"}}, cache_dir=tmp_path
    )
    iid, sys_ = read_provenance(out["iid"]), read_provenance(out["sys"])
    assert sys_["sampling"]["scheme"] == "systematic" and "scheme" not in iid["sampling"]
    assert sys_["key"] != iid["key"] and sys_["teacher_bytes"] == iid["teacher_bytes"]
    assert out["sys"].column_names == out["iid"].column_names
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor(out["sys"]["input_ids"][0])[None]).logits[0]
    p = logits.float().softmax(-1)
    for position, (ids, counts) in enumerate(
        zip(out["sys"]["teacher_sample_ids"][0], out["sys"]["teacher_sample_counts"][0], strict=True)
    ):
        drawn = torch.zeros(p.shape[-1]).index_add_(0, torch.tensor(ids), torch.tensor(counts).float())
        expected = 8 * p[position]
        assert ((drawn >= expected.floor() - 1e-4) & (drawn <= expected.ceil() + 1e-4)).all(), position
    with pytest.raises(ValueError, match=r"^sample_scheme must be one of iid, systematic .*, got 'sobol'\.$"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_scheme="sobol")


def test_a_head_in_8_bits_saves_a_byte_a_head_token_and_is_format_4(tmp_path):
    """``sample_head_quantized``: the head's probabilities as uint8 ``teacher_head_quanta``, the same head ids and
    draws as the float16 cache of the same seed, one byte less per head token, cache format 4 (a format-3 reader
    refuses it), its own key; without a head it is refused in one line."""
    dataset, teacher = random_classification_dataset(10, seed=7), _gpt2(1)
    spec = {"num_samples": 6, "sample_head": 3, "sample_seed": 3, "sample_counts": False}
    out = precompute_teacher_caches(
        teacher, dataset, {"f16": spec, "q8": {**spec, "sample_head_quantized": True}}, cache_dir=tmp_path
    )
    f16, q8 = read_provenance(out["f16"]), read_provenance(out["q8"])
    assert out["q8"].features["teacher_head_quanta"].feature.feature.dtype == "uint8"
    assert out["q8"]["teacher_head_ids"] == out["f16"]["teacher_head_ids"]
    assert out["q8"]["teacher_sample_ids"] == out["f16"]["teacher_sample_ids"]
    for quanta, probs in zip(out["q8"]["teacher_head_quanta"], out["f16"]["teacher_head_probs"], strict=True):
        assert (abs(torch.tensor(quanta).float() - 255 * torch.tensor(probs).float()) < 1 + 1e-2).all()
    tokens = sum(len(row) for row in out["q8"]["teacher_sample_ids"])
    assert f16["teacher_bytes"] - q8["teacher_bytes"] == 3 * tokens  # 3 head tokens, 1 byte each
    assert (q8["format_version"], f16["format_version"]) == (4, 3) and q8["key"] != f16["key"]
    assert q8["sampling"]["head_quantized"] is True and "head_quantized" not in f16["sampling"]
    with pytest.raises(ValueError, match=r"^sample_head_quantized stores .* but sample_head is 0: give"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_head_quantized=True)


def test_adaptive_draws_are_pooled_in_one_code_a_row_with_the_head_format_8(tmp_path):
    """``sample_allocation="adaptive"``: each row's ``n L`` draws in one interpolative code a row, ``teacher_sample_code``
    (uint8), with each token's count in uint8 ``teacher_sample_lengths`` ``[L, 1]``, summing to ``n L`` a row and
    at least 1 each; the code holds the head's ids too (no ``teacher_head_ids`` column): the same head as the even
    cache of the same seed, each token's ids ascending and its probabilities in their order; the code in fewer
    bytes than the even cache's uint16 head ids and draws (its size is the code's and the counts' bytes, exactly);
    format 8 and its own key; the collator gives each token its own draws, every one a token its teacher gives
    probability, and reads a format-5 row (uint16 draws), a format-6 row (a Rice code) and a format-7 row (the
    interpolative code, head ids apart) of the same draws to the same batch. With counts, or an unknown
    allocation, it is refused in one line."""
    from hf_distill import DistillationDataCollator
    from hf_distill.draw_code import decode_draws, decode_row, encode_draws

    dataset, teacher = random_classification_dataset(10, seed=7), _gpt2(1)
    with torch.no_grad():  # sharper logits: tokens whose tails differ, so their shares differ
        teacher.get_output_embeddings().weight.mul_(30.0)
    spec = {"num_samples": 6, "sample_head": 2, "sample_seed": 3, "sample_counts": False}
    out = precompute_teacher_caches(
        teacher, dataset, {"even": spec, "adaptive": {**spec, "sample_allocation": "adaptive"}}, cache_dir=tmp_path
    )
    even, adaptive = read_provenance(out["even"]), read_provenance(out["adaptive"])
    assert not {"teacher_sample_ids", "teacher_head_ids"} & set(out["adaptive"].column_names)
    assert out["adaptive"].features["teacher_sample_lengths"].feature.feature.dtype == "uint8"
    assert out["adaptive"].features["teacher_sample_code"].feature.dtype == "uint8"
    vocab = teacher.config.vocab_size
    rows = zip(out["adaptive"]["teacher_sample_code"], out["adaptive"]["teacher_sample_lengths"],
               out["adaptive"]["teacher_head_probs"], out["even"]["teacher_head_ids"], out["even"]["teacher_head_probs"],
               strict=True)  # fmt: skip
    for code, lengths, probs, even_ids, even_probs in rows:
        assert sum(x for [x] in lengths) == 6 * len(lengths) and min(lengths) >= [1]
        head, draws = decode_row(np.array(code, dtype=np.uint8), np.array(lengths))
        assert 0 <= draws.max() < vocab and head.shape == (len(lengths), 2)
        order = np.argsort(even_ids, axis=1)
        np.testing.assert_array_equal(head, np.take_along_axis(np.array(even_ids), order, axis=1))
        np.testing.assert_array_equal(probs, np.take_along_axis(np.array(even_probs), order, axis=1))
    assert len({x for rows in out["adaptive"]["teacher_sample_lengths"] for [x] in rows}) > 1  # not even
    tokens = sum(len(row) for row in out["adaptive"]["teacher_sample_lengths"])
    rows, code_bytes = len(out["adaptive"]), sum(len(code) for code in out["adaptive"]["teacher_sample_code"])
    assert code_bytes < 2 * (6 + 2) * tokens  # fewer bytes than the uint16 draws and head ids
    # the even cache's draws and head ids (uint16) against the code and the counts (1 byte a token), each an int32
    # offset a row
    assert adaptive["teacher_bytes"] - even["teacher_bytes"] == code_bytes + 4 * rows + tokens + 4 * rows - (
        2 * 6 * tokens + 4 * rows + 2 * 2 * tokens + 4 * rows)
    assert (adaptive["format_version"], even["format_version"]) == (8, 3) and adaptive["key"] != even["key"]
    assert adaptive["sampling"]["allocation"] == "adaptive" and "allocation" not in even["sampling"]
    features = [{k: v for k, v in out["adaptive"][i].items() if k.startswith("teacher_")} for i in range(2)]
    width = max(len(f["teacher_sample_lengths"]) for f in features)  # rows of two lengths, padded to the longer
    batch = DistillationDataCollator()([{"input_ids": [1] * width, **f} for f in features])
    assert "teacher_sample_lengths" not in batch and "teacher_sample_code" not in batch
    counts = batch["teacher_sample_counts"]
    for i, feature in enumerate(features):
        assert counts[i].sum(-1)[: len(feature["teacher_sample_lengths"])].tolist() == [
            x for [x] in feature["teacher_sample_lengths"]]  # fmt: skip
    logits = teacher(input_ids=torch.tensor([dataset[0]["input_ids"]])).logits[0]
    probs = torch.softmax(logits.float(), -1).gather(-1, batch["teacher_sample_ids"][0][: logits.shape[0]])
    assert (probs[counts[0][: logits.shape[0]] > 0] > 0).all()
    # a format-5 row (the same pooled draws as uint16 ids, [L, n], the head ids apart) is read to the same batch
    decoded = [decode_row(np.array(f["teacher_sample_code"], dtype=np.uint8), np.array(f["teacher_sample_lengths"]))
               for f in features]  # fmt: skip
    apart = [{k: v for k, v in f.items() if k != "teacher_sample_code"} | {"teacher_head_ids": head.tolist()}
             for f, (head, _) in zip(features, decoded, strict=True)]  # fmt: skip
    as_ids = [f | {"teacher_sample_ids": draws.reshape(-1, 6).tolist()} for f, (_, draws) in zip(apart, decoded,
                                                                                                    strict=True)]  # fmt: skip
    old = DistillationDataCollator()([{"input_ids": [1] * width, **f} for f in as_ids])
    assert old.keys() == batch.keys() and all(torch.equal(old[k], batch[k]) for k in batch)
    # a format-6 row (the same draws in a Rice code) and a format-7 row (the interpolative code) too
    for kind in ("rice", "interpolative"):
        coded = [f | {"teacher_sample_code": encode_draws(draws, np.array(f["teacher_sample_lengths"]), vocab,
                                                          kind).tolist()}
                 for f, (_, draws) in zip(apart, decoded, strict=True)]  # fmt: skip
        assert coded[0]["teacher_sample_code"] != features[0]["teacher_sample_code"]
        again = DistillationDataCollator()([{"input_ids": [1] * width, **f} for f in coded])
        assert again.keys() == batch.keys() and all(torch.equal(again[k], batch[k]) for k in batch)
    assert decode_draws(np.array(features[0]["teacher_sample_code"], dtype=np.uint8),
                        np.array(features[0]["teacher_sample_lengths"])).tolist() == decoded[0][1].tolist()  # fmt: skip
    cut = dict(features[0], teacher_sample_code=features[0]["teacher_sample_code"][:-3])
    with pytest.raises(ValueError, match=r"^An RS-KD draw code of \d+ bytes does not hold the \d+ draws"):
        DistillationDataCollator()([{"input_ids": [1] * width, **cut}])
    with pytest.raises(ValueError, match=r"^sample_allocation: adaptive stores each token's draws .* set sample_counts"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_allocation="adaptive")
    with pytest.raises(ValueError, match=r"^sample_allocation must be one of even, adaptive .*got 'fair'"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, num_samples=4, sample_counts=False,
                                  sample_allocation="fair")  # fmt: skip


def test_packed_rows_are_read_without_a_gather_and_store_what_a_padded_batch_stores(monkeypatch):
    """Packed LM blocks fill every row of a batch, so the logits are taken as a view, with no (tokens x V) copy of
    the real tokens; one shorter row in the same batch sends the same rows through that gather instead."""
    from datasets import Dataset

    from hf_distill.teacher_cache import inference

    gathers = []
    stack = inference.np.stack
    monkeypatch.setattr(inference.np, "stack", lambda arrays: gathers.append(1) or stack(arrays))
    g = torch.Generator().manual_seed(7)
    full = [torch.randint(5, len(VOCAB), (8,), generator=g).tolist() for _ in range(4)]
    short = torch.randint(5, len(VOCAB), (5,), generator=g).tolist()
    packed = Dataset.from_dict({"input_ids": full, "attention_mask": [[1] * 8] * 4})
    mixed = Dataset.from_dict({"input_ids": [*full, short], "attention_mask": [[1] * 8] * 4 + [[1] * 5]})
    view = precompute_teacher_caches(_gpt2(1), packed, FORMATS, max_batch_tokens=1024)
    assert not gathers
    gathered = precompute_teacher_caches(_gpt2(1), mixed, FORMATS, max_batch_tokens=1024)
    assert gathers  # one batch of five rows, one of them shorter
    for name in FORMATS:
        for column in view[name].column_names:
            assert view[name][column] == gathered[name][column][:4], (name, column)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sampling_refuses_a_non_finite_logit_anywhere(bad):
    teacher = _gpt2(1)

    def poison(module, args, output):
        output[0, -1, 7] = bad
        return output

    teacher.lm_head.register_forward_hook(poison)
    dataset = random_classification_dataset(3, seed=2)
    with pytest.raises(InputError, match="NaN or inf, so no tokens can be sampled"):
        precompute_teacher_caches(teacher, dataset, {"sampled": FORMATS["sampled"]}, max_batch_tokens=1024)


def test_one_table_holds_the_draws_defaults_for_the_library_and_the_script():
    """precompute_teacher_logits' arguments, a format of precompute_teacher_caches that leaves a setting out, and the
    script's flags (but for the temperature and seed, the run's there) all take the draws' defaults from
    SAMPLING_DEFAULTS: a format spelling every default out draws what one leaving them out draws."""
    import inspect

    from conftest import load_module

    from hf_distill.teacher_cache import SAMPLING_DEFAULTS

    signature = inspect.signature(precompute_teacher_logits).parameters
    assert {name: signature[name].default for name in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    script = load_module("scripts/precompute_teacher_logits.py")
    assert script.SAMPLING_OPTIONS == SAMPLING_DEFAULTS | {"sample_temperature": None, "sample_seed": None}
    dataset, teacher = random_classification_dataset(4, seed=3), _gpt2(1)
    out = precompute_teacher_caches(
        teacher, dataset, {"bare": {"num_samples": 3}, "spelled": {"num_samples": 3, **SAMPLING_DEFAULTS}}
    )
    assert out["bare"]["teacher_sample_ids"] == out["spelled"]["teacher_sample_ids"]
