"""A teacher cache in shards: under ``accelerate launch`` every process computes its own slice.

A cache of ``M`` shards is ``M`` Arrow files under its key, ``teacher-logits-<key>-00003-of-00008.arrow``
(one shard: ``teacher-logits-<key>.arrow``), each a contiguous slice of the dataset, and one provenance
``teacher-logits-<key>.json`` whose ``shards`` lists every file with its first row, rows, bytes and
sha256. Reading a cache is reading the listed files in order, whatever the number of processes that
reads it, so the key does not depend on the process count: a cache written by 2 processes is a hit for
1 and the other way round.

How one call goes (:func:`compute_shards`):

1. The main process chooses the layout: the listed shards of a provenance that describes the key (a
   hit, or a damaged cache to repair), else the shards named by records a killed run left
   (:func:`shard_record_path`), else one shard per process. Shard ``j`` goes to process ``j % N``.
2. Each process checks its shards (file size and sha256 against the record, or the provenance) and
   computes those that fail: a missing or corrupt shard is recomputed alone. Several caches of one
   dataset asked for at once (several formats) are planned together, and the shards of theirs that
   cover the same rows are computed by one teacher pass (:func:`compute_own_shards`). A shard is written to a
   temporary file and renamed (``datasets``), then checked for NaN and inf, then its record is
   written (atomically): no shard is ever taken as complete before it is.
3. The processes meet once (a gloo group without a practical timeout); the main process checks every shard it is told of
   (present, its bytes and rows, its key) and writes the provenance listing them, last. A shard
   that another process reports as written but that the main process cannot see stops every
   process with an error naming the path: ``cache_dir`` must be on a filesystem every machine sees.
4. Every process opens the listed files, in order: the whole dataset.

Shard boundaries fall on multiples of ``sort_window``, the length-sorted windows the teacher runs
over, so every forward pass sees the same batch whatever the number of processes: the values are
bit-identical with 1, 2 or 3 processes (same thread count, same machine).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import pickle
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets

from ..errors import InputError, MissingFileError
from .key import _CACHE_PREFIX, write_json_atomic
from .storage import _file_sha256, _listed_shards, _open_arrow

logger = logging.getLogger(__name__)

SHARD_RECORD_SUFFIX = ".shard.json"
_LONGEST_WAIT = datetime.timedelta(days=7)


def shard_bounds(num_rows: int, num_shards: int, sort_window: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of ``num_shards`` contiguous shards, cut at multiples of ``sort_window``.

    The ``ceil(num_rows / sort_window)`` windows are shared out as evenly as they go (the first
    shards get one fewer when they do not divide); with fewer windows than shards, some are empty.
    """
    windows = -(-num_rows // sort_window)
    cuts = [min(windows * j // num_shards * sort_window, num_rows) for j in range(num_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def shard_file(key: str, index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``; a one-shard cache is ``teacher-logits-<key>.arrow``."""
    if num_shards == 1:
        return f"{_CACHE_PREFIX}{key}.arrow"
    return f"{_CACHE_PREFIX}{key}-{index:05d}-of-{num_shards:05d}.arrow"


def shard_record_path(cache_dir: Path, file: str) -> Path:
    """The record a process writes beside a shard once it is complete (removed when the provenance is)."""
    return cache_dir / (file.removesuffix(".arrow") + SHARD_RECORD_SUFFIX)


def _layout(key: str, num_rows: int, num_shards: int, sort_window: int) -> list[dict[str, Any]]:
    """The shards of a new cache; empty ones are left out (an empty dataset keeps its one, empty, shard)."""
    bounds = shard_bounds(num_rows, num_shards, sort_window)
    kept = [j for j, (start, stop) in enumerate(bounds) if stop > start] or [0]
    return [
        {"file": shard_file(key, j, num_shards), "index": j, "num_shards": num_shards, "start": start,
         "num_rows": stop - start}
        for j, (start, stop) in ((j, bounds[j]) for j in kept)
    ]  # fmt: skip


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _left_by_a_killed_run(cache_dir: Path, key: str) -> int | None:
    """The shard count of the records a killed run left for ``key`` (the most recent), or None."""
    pattern = re.compile(
        re.escape(f"{_CACHE_PREFIX}{key}") + r"(-\d{5}-of-(\d{5}))?" + re.escape(SHARD_RECORD_SUFFIX)
    )
    found = []
    for path in cache_dir.glob(f"{_CACHE_PREFIX}{key}*{SHARD_RECORD_SUFFIX}"):
        match = pattern.fullmatch(path.name)
        if match:
            found.append((path.stat().st_mtime, int(match.group(2) or 1)))
    return max(found)[1] if found else None


def plan_shards(
    cache_dir: Path, key: str, components: Mapping[str, Any], num_processes: int, sort_window: int
) -> tuple[list[dict[str, Any]], bool]:
    """The shards of the cache (main process) and whether a provenance that describes ``key`` lists them."""
    meta = cache_dir / f"{_CACHE_PREFIX}{key}.json"
    listed = _listed_shards(meta, key, components)
    if listed is not None:
        return listed, True
    meta.unlink(missing_ok=True)  # unreadable: recomputed
    num_shards = _left_by_a_killed_run(cache_dir, key) or num_processes
    if num_shards != num_processes:
        logger.info(
            "Resuming the teacher cache %s from the %d shards a previous run started.", key, num_shards
        )
    return _layout(key, components["num_rows"], num_shards, sort_window), False


def _intact(
    cache_dir: Path, shard: Mapping[str, Any], key: str, from_provenance: bool
) -> dict[str, Any] | None:
    """The shard's record when its file is complete (bytes and sha256 as recorded), else None."""
    record = shard if from_provenance else _read_record(shard_record_path(cache_dir, shard["file"]))
    expected = {k: shard[k] for k in ("file", "start", "num_rows")}
    if (
        record is None
        or any(record.get(k) != v for k, v in expected.items())
        or record.get("key", key) != key
    ):
        return None
    if not (cache_dir / shard["file"]).exists() or "arrow_sha256" not in record:
        return None
    try:
        _open_arrow(cache_dir / shard["file"], record, verify_hash=True)
    except ValueError as err:
        logger.warning("%s Recomputing this shard.", err)
        return None
    return dict(record)


def compute_own_shards(
    cache_dir: Path,
    plans: Mapping[str, tuple[list[dict[str, Any]], bool]],
    compute_rows: Callable[[int, int, dict[str, Path]], None],
) -> dict[str, list[dict[str, Any]]]:
    """This process's shards (``j % N``) of each cache in ``plans``, checked and computed where they are not
    complete; their records, by key.

    ``plans``: key -> (its shards, whether a provenance lists them). The shards of several caches that
    cover the same rows are computed by one call ``compute_rows(start, num_rows, {key: arrow})``: one
    teacher pass writes every format asked for (new caches of the same dataset share their layout).
    """
    state = PartialState()
    done: dict[str, list[dict[str, Any]]] = {key: [] for key in plans}
    missing: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}  # (start, rows) -> key -> shard
    for key, (shards, from_provenance) in plans.items():
        for shard in shards[state.process_index :: state.num_processes]:
            record = _intact(cache_dir, shard, key, from_provenance)
            if record is None:
                missing.setdefault((shard["start"], shard["num_rows"]), {})[key] = shard
            else:
                done[key].append(record)
    for (start, num_rows), shards in missing.items():
        for shard in shards.values():
            shard_record_path(cache_dir, shard["file"]).unlink(missing_ok=True)
        # written to temporary files and renamed; NaN/inf refused
        compute_rows(start, num_rows, {key: cache_dir / shard["file"] for key, shard in shards.items()})
        for key, shard in shards.items():
            arrow = cache_dir / shard["file"]
            record = {
                **{k: shard[k] for k in ("file", "index", "num_shards", "start", "num_rows")},
                "key": key,
                "arrow_bytes": arrow.stat().st_size,
                "arrow_sha256": _file_sha256(arrow),
                "computed": True,
            }
            write_json_atomic(
                shard_record_path(cache_dir, shard["file"]), record
            )  # last: the shard is complete
            done[key].append(record)
    where = {"process": state.process_index, "host": socket.gethostname()}
    return {key: [{**record, **where} for record in records] for key, records in done.items()}


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to be sent to the other processes), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


@functools.cache
def _meeting_group() -> torch.distributed.ProcessGroup:
    """A gloo group without a practical timeout: at the end, the processes wait for the slowest shard, which
    on a resumed run (one shard left, the others done) can take far longer than the default group's timeout."""
    return torch.distributed.new_group(backend="gloo", timeout=_LONGEST_WAIT)


def all_processes(work: Callable[[], Any]) -> list[Any]:
    """Every process's ``work()``, on every process; when one raises, every process raises its error."""
    try:
        outcome = (work(), None)
    except Exception as err:
        own, outcome = err, (None, _portable(err))
    state = PartialState()
    outcomes = [outcome]
    if state.num_processes > 1:
        outcomes = [None] * state.num_processes
        torch.distributed.all_gather_object(outcomes, outcome, group=_meeting_group())
    for process, (_, error) in enumerate(outcomes):
        if error is not None:
            if process == PartialState().process_index:
                raise own
            raise RuntimeError(
                f"Process {process} failed while computing the teacher cache: {error}"
            ) from error
    return [result for result, _ in outcomes]


def on_main(work: Callable[[], Any]) -> Any:
    """``work()`` on the main process, its result (or its error, raised) on every process."""
    state = PartialState()
    outcome = [None]
    if state.is_main_process:
        try:
            outcome = [(work(), None)]
        except Exception as err:
            own, outcome = err, [(None, _portable(err))]
    if state.num_processes > 1:
        torch.distributed.broadcast_object_list(outcome, src=0, group=_meeting_group())
    result, error = outcome[0]
    if error is not None:
        if state.is_main_process:
            raise own
        raise error
    return result


def check_shards(cache_dir: Path, records: list[dict[str, Any]], key: str, num_rows: int) -> None:
    """Main process: every shard reported is there, with its bytes, rows and key, and together they cover the rows."""
    here = socket.gethostname()
    start = 0
    for record in sorted(records, key=lambda r: r["index"]):
        arrow = cache_dir / record["file"]
        if not arrow.exists():
            raise MissingFileError(
                f"Process {record['process']} (on {record['host']}) wrote the teacher-cache shard {arrow}, but the "
                f"main process (on {here}) cannot see it: cache_dir must be on a filesystem every machine sees "
                "(e.g. NFS or a mounted bucket), at the same path. Point cache_dir there and run again; the "
                "shards already written are reused."
            )
        if record.get("key") != key or record["start"] != start:
            raise InputError(
                f"Teacher-cache shard {arrow} is recorded for key {record.get('key')} from row {record['start']}, "
                f"expected key {key} from row {start}: delete it and its {SHARD_RECORD_SUFFIX} record to recompute."
            )
        _open_arrow(arrow, record, verify_hash=False)  # bytes (a stat) and rows; its writer hashed it
        start += record["num_rows"]
    if start != num_rows:
        raise ValueError(f"The teacher-cache shards in {cache_dir} hold {start} rows, expected {num_rows}.")


def open_shards(cache_dir: Path, shards: list[dict[str, Any]], dataset: Dataset) -> Dataset:
    """The listed shard files, in order, as one dataset (memory-mapped: nothing is copied)."""
    parts = [
        Dataset.from_file(str(cache_dir / shard["file"]), split=dataset.split)
        for shard in sorted(shards, key=lambda s: s["start"])
    ]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def remove_records(cache_dir: Path, shards: list[dict[str, Any]]) -> None:
    """Once the provenance lists them, the shards' own records are no longer needed."""
    for shard in shards:
        shard_record_path(cache_dir, shard["file"]).unlink(missing_ok=True)
    for path in cache_dir.glob(f"{_CACHE_PREFIX}*{SHARD_RECORD_SUFFIX}.tmp*"):  # left by killed processes
        path.unlink(missing_ok=True)
