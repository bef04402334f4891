"""Corrupt or hostile inputs: each gets a clear error, and nothing already written is lost.

| input | what the user sees | what is kept |
|---|---|---|
| NaN/inf/null in cached teacher logits handed to ``DistillationTrainer`` | ``ValueError`` at construction naming the column and the rows (a vectorised Arrow scan) | ``output_dir`` never created or unchanged |
| NaN/inf from a live teacher during training | ``FloatingPointError`` naming the step, raised before that step's optimizer update (``check_finite=True``, one sync per step) | the student as after the previous step; checkpoints in ``output_dir`` unchanged |
| NaN/inf from the teacher in ``precompute_teacher_logits`` | ``ValueError`` naming the rows; the new data file is removed before a provenance is written | no cache is ever completed; other caches in ``cache_dir`` unchanged |
| truncated or garbled ``.arrow`` found by ``precompute_teacher_logits`` under its key | a warning, then the cache is recomputed (a corrupt file holds nothing to keep) | a correct cache replaces the corrupt one |
| truncated or garbled ``.arrow`` given to ``load_teacher_cache`` | ``ValueError`` with the path: size, sha256, unreadable or row count | the files are not touched |
| provenance ``.json`` that parses but lies (another cache's key, an edited ``weights_hash``) | ``ValueError`` listing what differs (``precompute_teacher_logits``) or that its contents do not hash to its key (``load_teacher_cache``) | both files untouched (which one is wrong cannot be told) |
| a recipe value of the wrong type or out of range | ``ValueError`` naming the key (or argparse's usage error naming the flag) | nothing is written |
| a local teacher whose ``config.json`` has ``auto_map`` | ``ValueError`` saying to pass ``teacher_init_kwargs={"trust_remote_code": True}`` | its code never runs |
| a full disk during ``precompute_teacher_logits`` | ``OSError(ENOSPC)`` naming the cache file and what to do | no partial file; a rerun recomputes |
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import re
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ForwardCounter, config, random_classification_dataset, tiny_bert
from datasets import arrow_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.config import TRAINING_RANGES, Range
from hf_distill.teacher_cache import (
    cache_paths,
    load_teacher_cache,
    nonfinite_rows,
    precompute_teacher_logits,
    read_provenance,
)
from hf_distill.teachers import load_teacher
from hf_distill.text_classification import DATACLASSES, RecipeParser
from hf_distill.text_classification.arguments import RANGES as TEXT_RANGES


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def poison(model, rows_or_calls, value=float("nan")):
    """From the forward calls in ``rows_or_calls`` (1-based) on, the model's logits hold ``value``."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) in rows_or_calls:
            output.logits[0, 0] = value
        return output

    return model.register_forward_hook(hook)


# ---- NaN and inf -------------------------------------------------------------------------------------


def test_nonfinite_cached_logits_are_refused_with_their_rows(tmp_path, tokenizer):
    dataset = precompute_teacher_logits(
        tiny_bert(seed=1), random_classification_dataset(12), cache_dir=tmp_path / "cache", dtype="float32"
    )
    logits = [list(row) for row in dataset["teacher_logits"]]
    logits[3][1], logits[7][0] = float("nan"), float("-inf")
    bad = dataset.remove_columns("teacher_logits").add_column("teacher_logits", logits)
    assert nonfinite_rows(bad) == {"teacher_logits": [3, 7]}
    assert nonfinite_rows(bad.select([7, 0, 3])) == {"teacher_logits": [0, 2]}  # a view's own row numbers
    assert nonfinite_rows(dataset) == {}
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"teacher_logits: 2 rows, e\.g\. \[3, 7\]"):
        DistillationTrainer(
            model=tiny_bert(seed=2), args=config(tmp_path), train_dataset=bad, processing_class=tokenizer
        )
    assert not out.exists()


def test_nonfinite_or_null_token_level_and_topk_columns_are_found_by_row():
    from datasets import Dataset

    nan, inf = float("nan"), float("inf")
    ok = [[0.5, -1.0], [2.0, 0.0]]  # (L=2, C=2) per row
    rows = {
        "teacher_logits": [ok, [[0.5, nan], [2.0, 0.0]], ok, None, [[0.5, 1.0], None], ok],
        "teacher_topk_values": [ok, ok, [[1.0, -inf], [0.0, 0.0]], ok, ok, [[1.0, None], [0.0, 0.0]]],
        "teacher_topk_indices": [[[1, 2], [3, 4]]] * 6,
    }
    assert nonfinite_rows(Dataset.from_dict(rows)) == {
        "teacher_logits": [1, 3, 4],
        "teacher_topk_values": [2, 5],
    }
    clean = {k: [v[0]] * 6 for k, v in rows.items()}
    assert nonfinite_rows(Dataset.from_dict(clean)) == {}


class Snapshots(TrainerCallback):
    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}


def test_nonfinite_live_teacher_stops_before_the_optimizer_step(tmp_path, tokenizer):
    teacher, snapshots = tiny_bert(seed=1), Snapshots()
    poison(teacher, {3})  # the third step's teacher forward
    args = config(tmp_path, per_device_train_batch_size=4, save_strategy="steps", save_steps=1)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2),
        teacher_model=teacher,
        args=args,
        train_dataset=random_classification_dataset(16),
        processing_class=tokenizer,
        callbacks=[snapshots],
    )
    with pytest.raises(FloatingPointError, match=r"Step 3 .*NaN or inf.*student is as after step 2"):
        trainer.train()
    assert sorted(snapshots.states) == [1, 2]
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, snapshots.states[2][key]), key
        assert torch.isfinite(value).all()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_check_finite_off_lets_the_teacher_nan_through(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1)
    poison(teacher, set(range(1, 100)), float("inf"))
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2),
        teacher_model=teacher,
        args=config(tmp_path, per_device_train_batch_size=8, check_finite=False),
        train_dataset=random_classification_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()  # what the check prevents: a student updated from non-finite teacher outputs
    assert any(not torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_nonfinite_teacher_never_completes_a_cache(tmp_path):
    cache = tmp_path / "cache"
    good = precompute_teacher_logits(tiny_bert(seed=3), random_classification_dataset(10), cache_dir=cache)
    before = snapshot(cache)
    teacher = tiny_bert(seed=1)
    poison(teacher, {2}, float("inf"))
    with pytest.raises(ValueError, match=r"teacher_logits: 1 rows.*No cache was written"):
        precompute_teacher_logits(
            teacher, random_classification_dataset(10), cache_dir=cache, max_batch_size=1, dtype="float32"
        )
    assert snapshot(cache) == before  # the other cache is intact, nothing new is there
    assert len(good) == 10


# ---- corrupt cache files -----------------------------------------------------------------------------


def _cache(tmp_path):
    teacher, dataset = tiny_bert(seed=1), random_classification_dataset(40)
    out = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    provenance = read_provenance(tmp_path)
    return teacher, dataset, out, *cache_paths(tmp_path, provenance["key"])


def _truncate(arrow: Path) -> None:
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) * 2 // 3])


def _garble(arrow: Path) -> None:
    data = bytearray(arrow.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    data[middle : middle + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    arrow.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble])
def test_corrupt_arrow_under_its_key_is_recomputed(tmp_path, damage, caplog):
    teacher, dataset, out, arrow, meta = _cache(tmp_path)
    expected = [list(row) for row in out["teacher_logits"]]
    damage(arrow)
    counter = ForwardCounter(teacher)
    again = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    assert counter.calls > 0 and "Recomputing" in caplog.text and str(arrow) in caplog.text
    assert again["teacher_logits"] == expected
    assert load_teacher_cache(tmp_path, teacher=teacher)["teacher_logits"] == expected


@pytest.mark.parametrize(
    ("damage", "message"), [(_truncate, "bytes, its provenance says"), (_garble, "sha256")]
)
def test_corrupt_arrow_is_refused_by_load_teacher_cache_with_its_path(tmp_path, damage, message):
    *_, arrow, meta = _cache(tmp_path)
    damage(arrow)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        load_teacher_cache(tmp_path)
    assert str(arrow) in str(refused.value)
    assert snapshot(tmp_path) == before


def test_provenance_of_another_cache_is_refused_with_what_differs(tmp_path):
    teacher, dataset, _, arrow, meta = _cache(tmp_path)
    other_dir = tmp_path / "other"
    precompute_teacher_logits(tiny_bert(seed=5), dataset, cache_dir=other_dir)
    other = next(other_dir.glob("*.json"))
    shutil.copy(other, meta)  # another teacher's provenance, filed under our key
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"key: cache has '[0-9a-f]+', expected .*weights_hash"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="filed under key"):
        load_teacher_cache(meta)
    assert snapshot(tmp_path) == before


def test_edited_weights_hash_is_refused(tmp_path):
    teacher, dataset, _, arrow, meta = _cache(tmp_path)
    provenance = json.loads(meta.read_text())
    provenance["weights_hash"] = "0" * 64
    meta.write_text(json.dumps(provenance))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"weights_hash: cache has '0000"):
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="components hash to"):
        load_teacher_cache(tmp_path)
    assert snapshot(tmp_path) == before


# ---- a full disk -------------------------------------------------------------------------------------


def test_full_disk_during_precompute_keeps_nothing_and_a_rerun_recomputes(tmp_path, monkeypatch):
    teacher, dataset = tiny_bert(seed=1), random_classification_dataset(30)
    writes = []

    def full_after_one(write):  # the disk fills on the second batch written, whichever way it is written
        def wrapped(self, *args, **kwargs):
            writes.append(1)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(self, *args, **kwargs)

        return wrapped

    for name in ("write_batch", "write_table"):
        monkeypatch.setattr(
            arrow_writer.ArrowWriter, name, full_after_one(getattr(arrow_writer.ArrowWriter, name))
        )
    with pytest.raises(OSError, match="No space left on device while writing the teacher cache") as full:
        precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, sort_window=8)
    assert full.value.errno == errno.ENOSPC and len(writes) == 2
    assert snapshot(tmp_path) == {}  # no partial file, no provenance
    monkeypatch.undo()
    counter = ForwardCounter(teacher)
    out = precompute_teacher_logits(teacher, dataset, cache_dir=tmp_path, sort_window=8)
    assert counter.calls > 0 and len(out) == 30 and len(snapshot(tmp_path)) == 2


# ---- teachers with their own code --------------------------------------------------------------------


def test_teacher_with_remote_code_needs_trust_remote_code(tmp_path, tokenizer):
    folder = tmp_path / "teacher"
    tiny_bert(seed=1).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilBert"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('this code must not run')\n")
    with pytest.raises(ValueError, match=r"auto_map.*teacher_init_kwargs=\{'trust_remote_code': True\}"):
        DistillationTrainer(
            model=tiny_bert(seed=2),
            teacher_model=str(folder),
            args=config(tmp_path),
            train_dataset=random_classification_dataset(8),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_teacher(str(folder), "sequence_classification", trust_remote_code=False)
    del cfg["auto_map"]  # the same checkpoint without its own code loads
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_teacher(str(folder), "sequence_classification").training is False


# ---- recipes -----------------------------------------------------------------------------------------


def _recipe_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for d in DATACLASSES for f in dataclasses.fields(d) if f.init}


RECIPE_FIELDS = _recipe_fields()
# Values of the wrong type or out of range, as YAML can write them.
BAD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4), st.floats(-2, 2)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
    st.sampled_from(["-1", "0", "1e-5", "nan", "inf", "true", "[1, 2]", "kl", "cosine", "steps", "no"]),
)


def _parse(recipe: dict, folder: Path):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(folder / "out")}))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return RecipeParser().parse_recipe_and_args(["--config", str(path)]), None
        except SystemExit:
            return None, stderr.getvalue()


def _has_type(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (typing.Any, object) or isinstance(annotation, str):
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


# Every numeric setting with a range, and that range (the tables the dataclasses check against).
RANGES = {
    **TRAINING_RANGES,
    **TEXT_RANGES,
    "temperature": Range(0, low_open=True),
    **{name: Range(0) for name in ("alpha", "beta", "hidden_loss_weight", "attention_loss_weight")},
    "max_seq_length": Range(2),
}
# A valid key beside the bad one in every recipe: the error must name the bad key, not list the recipe's.
DECOYS = {"speed_batch_size": 9, "compact_intermediate_size": 48}
# What a setting needs beside it to be valid at all.
NEEDS = {"dataloader_prefetch_factor": {"dataloader_num_workers": 1}}


def _edges(allowed: Range) -> tuple[list[float], list[float]]:
    """Values just inside and just outside ``allowed`` (integers where the range's ends are whole)."""
    low = allowed.low
    inside = [low + 1 if allowed.low_open else low]
    outside = [low if allowed.low_open else low - 1, float("nan"), float("inf")]
    if allowed.high < math.inf:
        inside.append((low + allowed.high) / 2)
        outside.append(allowed.high if allowed.high_open else allowed.high + 1)
    return inside, outside


def _check_recipe_value(tmp_path, key, value):
    """The recipe ``{key: value}`` (with a decoy key) parses to settings holding a value of the field's
    type and range, or is refused by an error that names ``key`` and not the decoy."""
    decoy = next(d for d in DECOYS if d != key)
    try:
        parsed, usage_error = _parse({key: value, decoy: DECOYS[decoy], **NEEDS.get(key, {})}, tmp_path)
    except ValueError as err:
        message = str(err)
        assert key in message and decoy not in message, f"{key}={value!r}: the error names another key: {err}"
        return "refused"
    if usage_error is not None:
        assert key in usage_error, f"{key}={value!r}: argparse's error does not name the flag: {usage_error}"
        return "refused"
    hints = {}
    for d in DATACLASSES:
        hints.update(typing.get_type_hints(d))
    for settings_object in parsed:
        if key in {f.name for f in dataclasses.fields(settings_object)}:
            got = getattr(settings_object, key)
            # TrainingArguments turns some values into objects of its own (enums, AcceleratorConfig).
            converted = type(got).__module__ != "builtins"
            assert converted or _has_type(got, hints[key]), f"{key}={value!r} gave {got!r} ({hints[key]})"
            if key in RANGES and got is not None:
                assert all(v in RANGES[key] for v in (got if isinstance(got, list) else [got])), (
                    f"{key}={value!r} was accepted, outside {RANGES[key]}"
                )
    return "accepted"


@pytest.mark.parametrize("key", sorted(set(RECIPE_FIELDS) - {"output_dir"}))
@settings(
    max_examples=2,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=BAD_VALUES)
def test_recipe_values_of_any_type_give_valid_settings_or_an_error_naming_the_key(tmp_path, key, value):
    _check_recipe_value(tmp_path, key, value)


# Numeric settings without a range of their own, each with the reason; every other int or float
# setting must have one in RANGES (a key dropped from the code's tables fails the test below).
UNBOUNDED = {
    "teacher_weights": "checked in __post_init__ (>= 0, positive sum)",
    "layer_map": "checked in __post_init__ (>= 0) and against the teacher's depth by the trainer",
}
ISSUE_EXAMPLES = [  # accepted by the parser before the range checks
    {"per_device_train_batch_size": -3},
    {"compact_num_layers": 0},
    {"speed_samples": 0},
    {"save_steps": -1},
]


def test_every_numeric_setting_has_a_range_or_is_listed_as_unbounded(tmp_path):
    numeric = set()
    for d in DATACLASSES:
        for name, hint in typing.get_type_hints(d).items():
            if name in RECIPE_FIELDS and re.search(r"\b(int|float)\b", str(hint)) and "dict" not in str(hint):
                numeric.add(name)
    assert numeric - set(UNBOUNDED) == set(RANGES)
    for recipe in ISSUE_EXAMPLES:
        (key,) = recipe
        with pytest.raises(ValueError, match=rf"{key} must be >"):
            _parse(recipe, tmp_path)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_numeric_setting_is_refused_outside_its_range_at_parse_time(tmp_path, key):
    hint = str(typing.get_type_hints(next(d for d in DATACLASSES if key in d.__dataclass_fields__))[key])
    whole, listed = "float" not in hint, "list" in hint
    inside, outside = _edges(RANGES[key])
    if whole:  # an integer setting: NaN and inf are not integers (a type error, tested above)
        inside, outside = [int(v) for v in inside], [int(v) for v in outside if math.isfinite(v)]
    for value in inside:
        assert _check_recipe_value(tmp_path, key, [value, value + 1] if listed else value) == "accepted"
    for value in outside:
        # the tables' keys give their range; the older checks (temperature, ...) their own words
        allowed = re.escape(str(RANGES[key])) + ", got" if key in {**TRAINING_RANGES, **TEXT_RANGES} else ""
        with pytest.raises(ValueError, match=rf"{key} must be {allowed}"):
            _parse({key: [value] if listed else value}, tmp_path)
