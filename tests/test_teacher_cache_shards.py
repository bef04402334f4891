"""The teacher cache computed in shards, one per process: the same cache whatever the process count,
resumed after a kill, a damaged shard recomputed alone, an unshared cache_dir refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import LaunchFailed, accelerate_launch
from shard_precompute import NUM_ROWS, SORT_WINDOW, RowCounter, formats, masked_lm_teacher, teacher_and_data

from hf_distill.teacher_cache import precompute_teacher_logits, read_provenance
from hf_distill.teacher_cache.shards import shard_bounds

SCRIPT = Path(__file__).parent / "shard_precompute.py"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: the same kernels, so the same bits
    yield
    torch.set_num_threads(threads)


def precompute(cache_dir: Path) -> tuple[np.ndarray, int]:
    """One process (this one): the teacher logits and the rows the teacher ran."""
    teacher, data = teacher_and_data()
    counter = RowCounter(teacher)
    out = precompute_teacher_logits(
        teacher, data, cache_dir=cache_dir, dtype="float32", sort_window=SORT_WINDOW, max_batch_size=4
    )
    return np.asarray(out.with_format("numpy")["teacher_logits"]), counter.rows


def launch(tmp_path: Path, processes: int, *steps: str, check: bool = True) -> list[list[dict]]:
    """``shard_precompute.py`` on ``processes`` processes; per step, what each process saved."""
    out = tmp_path / f"out-{processes}-{len(list(tmp_path.glob('out-*')))}"
    out.mkdir()
    accelerate_launch(
        [SCRIPT, out, *steps], processes=processes, log_dir=out / "logs", timeout=300, check=check
    )
    return [
        [dict(np.load(out / f"{n}-rank{r}.npz")) for r in range(processes)]
        if (out / f"{n}-rank0.npz").exists()
        else []
        for n in range(len(steps))
    ]


def files(folder: Path) -> list[str]:
    """The cache's file names, less ``teacher-logits-<key>`` (temporary files left by a kill are not listed)."""
    return sorted(p.name[len("teacher-logits-") + 32 :] for p in folder.glob("teacher-logits-*"))


def test_shards_are_contiguous_whole_sort_windows():
    for rows, shards, window in [(30, 2, 4), (30, 3, 4), (100, 8, 7), (5, 3, 4), (64, 1, 64)]:
        bounds = shard_bounds(rows, shards, window)
        assert len(bounds) == shards and bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert all(start % window == 0 for start, _ in bounds)
        sizes = [-(-(stop - start) // window) for start, stop in bounds]  # windows per shard
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_two_processes_write_every_format_from_one_pass_over_their_own_shards(tmp_path, one_thread):
    teacher, data = masked_lm_teacher(), teacher_and_data()[1]
    counter = RowCounter(teacher)
    values, counts = formats(teacher, data, tmp_path / "one")
    assert counter.rows == NUM_ROWS  # one pass for both formats
    (two,) = launch(tmp_path, 2, f"formats:{tmp_path / 'two'}")
    shards = shard_bounds(NUM_ROWS, 2, SORT_WINDOW)
    assert [int(r["rows"]) for r in two] == [
        stop - start for start, stop in shards
    ]  # each its own rows, once
    for rank in two:
        np.testing.assert_array_equal(rank["values"], values)
        np.testing.assert_array_equal(rank["counts"], counts)
    for name in ("one", "two"):  # two caches, each with its own provenance; no scratch file left
        assert len(list((tmp_path / name).glob("teacher-logits-*.json"))) == 2
        assert not list((tmp_path / name).glob("*together*"))


def test_two_processes_one_cache_reused_by_one_and_refused_when_unshared(tmp_path, one_thread):
    one, rows = precompute(tmp_path / "one")
    assert rows == NUM_ROWS
    two, hit, unshared = launch(
        tmp_path,
        2,
        f"compute:{tmp_path / 'two'}",
        f"compute:{tmp_path / 'one'}",
        f"unshared:{tmp_path / 'u'}",
    )
    # Each process ran the teacher on its own shard only, and returned the whole dataset, bit-identical.
    shards = shard_bounds(NUM_ROWS, 2, SORT_WINDOW)
    assert [int(r["rows"]) for r in two] == [stop - start for start, stop in shards]
    for rank in two:
        np.testing.assert_array_equal(rank["values"], one)
    provenance = read_provenance(tmp_path / "two")
    assert [(s["start"], s["num_rows"]) for s in provenance["shards"]] == [(a, b - a) for a, b in shards]
    assert files(tmp_path / "two") == ["-00000-of-00002.arrow", "-00001-of-00002.arrow", ".json"]
    # A cache written by one process is a hit for two, and the other way round: the key is the same.
    assert [int(r["rows"]) for r in hit] == [0, 0]
    np.testing.assert_array_equal(hit[1]["values"], one)
    again, rows = precompute(tmp_path / "two")
    assert rows == 0
    np.testing.assert_array_equal(again, one)
    assert provenance["key"] == read_provenance(tmp_path / "one")["key"]
    # The main process cannot see the shard process 1 wrote: every process stops, naming it and why.
    for rank in unshared:
        error = str(rank["error"])
        assert "rank0" in error and "-00001-of-00002.arrow" in error
        assert "filesystem every machine sees" in error
    assert not (tmp_path / "u" / "rank0" / f"teacher-logits-{provenance['key']}.json").exists()

    # A garbled shard, then a missing one, is recomputed alone (by one process) and the values are the same.
    key = provenance["key"]
    second = tmp_path / "two" / f"teacher-logits-{key}-00001-of-00002.arrow"
    data = bytearray(second.read_bytes())
    data[-100] ^= 0xFF
    second.write_bytes(bytes(data))
    again, rows = precompute(tmp_path / "two")
    assert rows == shards[1][1] - shards[1][0]
    np.testing.assert_array_equal(again, one)
    (tmp_path / "two" / f"teacher-logits-{key}-00000-of-00002.arrow").unlink()
    again, rows = precompute(tmp_path / "two")
    assert rows == shards[0][1] - shards[0][0]
    np.testing.assert_array_equal(again, one)


@pytest.mark.slow
def test_three_processes_give_the_same_bits(tmp_path, one_thread):
    one, _ = precompute(tmp_path / "one")
    (three,) = launch(tmp_path, 3, f"compute:{tmp_path / 'three'}")
    assert [int(r["rows"]) for r in three] == [b - a for a, b in shard_bounds(NUM_ROWS, 3, SORT_WINDOW)]
    for rank in three:
        np.testing.assert_array_equal(rank["values"], one)
    again, rows = precompute(tmp_path / "three")
    assert rows == 0
    np.testing.assert_array_equal(again, one)


@pytest.mark.slow
def test_a_killed_precompute_resumes_from_its_complete_shards(tmp_path, one_thread):
    cache = tmp_path / "cache"
    with pytest.raises(LaunchFailed):
        launch(tmp_path, 2, f"die:{cache}")
    # Shard 0 is complete (file and record); shard 1 was being written: nothing under its name, no provenance.
    assert files(cache) == ["-00000-of-00002.arrow", "-00000-of-00002.shard.json"]
    # One process resumes: the teacher runs over shard 1's rows only, and the cache is whole.
    values, rows = precompute(cache)
    start, stop = shard_bounds(NUM_ROWS, 2, SORT_WINDOW)[1]
    assert rows == stop - start
    reference, _ = precompute(tmp_path / "reference")
    np.testing.assert_array_equal(values, reference)
    provenance = read_provenance(cache)
    assert [s["file"][-21:] for s in provenance["shards"]] == [
        "-00000-of-00002.arrow",
        "-00001-of-00002.arrow",
    ]
    assert not list(cache.glob("*.shard.json"))  # records go once the provenance lists the shards
    assert (
        json.loads((cache / f"teacher-logits-{provenance['key']}.json").read_text())["num_rows"] == NUM_ROWS
    )


def test_a_cache_written_before_shards_is_still_a_hit(tmp_path):
    """A provenance without ``shards`` (one file, its size and sha256 at the top level) lists that one file."""
    from hf_distill.teacher_cache import load_teacher_cache
    from hf_distill.teacher_cache.storage import _file_sha256

    values, _ = precompute(tmp_path)
    meta = next(tmp_path.glob("teacher-logits-*.json"))
    provenance = json.loads(meta.read_text())
    (shard,) = provenance.pop("shards")
    arrow = tmp_path / shard["file"]
    assert arrow.name == f"teacher-logits-{provenance['key']}.arrow"
    meta.write_text(json.dumps({**provenance, "arrow_sha256": _file_sha256(arrow)}))
    again, rows = precompute(tmp_path)
    assert rows == 0
    np.testing.assert_array_equal(again, values)
    assert len(load_teacher_cache(tmp_path)) == NUM_ROWS
    arrow.write_bytes(arrow.read_bytes()[:-50])  # its recorded size and hash are still checked
    with pytest.raises(ValueError, match="bytes"):
        load_teacher_cache(tmp_path)
