"""Run by test_teacher_cache_shards.py under `accelerate launch`: ``precompute_teacher_logits`` on every process.

    shard_precompute.py OUT STEP [STEP ...]

Each step is ``MODE:DIR``; each process saves what it saw to ``OUT/<step number>-rank<i>.npz``
(``values``: the returned teacher logits, ``rows``: rows the teacher ran on this process, ``error``):

- ``compute:DIR``: precompute into ``DIR``.
- ``unshared:DIR``: every process gets its own ``DIR/rank<i>`` (a cache_dir no other machine sees); the
  error is saved.
- ``die:DIR``: process 1 dies (``os._exit``, as if killed) in the middle of its shard, once shard 0 is complete.
- ``formats:DIR``: a masked-LM teacher's top-k and RS-KD caches from one pass into ``DIR`` (:data:`FORMATS`);
  ``values``: the top-k values, ``counts``: the RS-KD counts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).parent))
from conftest import random_classification_dataset, tiny_bert, tiny_bert_config  # noqa: E402
from launch import leave_worker  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from hf_distill.teacher_cache import precompute_teacher_caches, precompute_teacher_logits  # noqa: E402

NUM_ROWS, SORT_WINDOW = 30, 4
FORMATS = {"topk": {"top_k": 5}, "sampled": {"num_samples": 4, "sample_head": 1, "sample_seed": 2}}


def masked_lm_teacher():
    torch.manual_seed(1)
    return BertForMaskedLM(tiny_bert_config(num_layers=2)).eval()


def formats(teacher, data, cache_dir):
    """The :data:`FORMATS` caches from one pass: (top-k values, RS-KD counts)."""
    out = precompute_teacher_caches(
        teacher,
        data,
        FORMATS,
        cache_dir=cache_dir,
        dtype="float32",
        sort_window=SORT_WINDOW,
        max_batch_size=4,
    )
    values = np.concatenate([np.asarray(v) for v in out["topk"].with_format("numpy")["teacher_topk_values"]])
    counts = np.concatenate(
        [np.asarray(c) for c in out["sampled"].with_format("numpy")["teacher_sample_counts"]]
    )
    return values, counts


def teacher_and_data():
    teacher = tiny_bert(seed=1, num_layers=2).eval()
    return teacher, random_classification_dataset(NUM_ROWS, seed=3)


class RowCounter:
    """Rows the teacher runs (a forward hook); ``die_after`` forwards, process 1 exits at once."""

    def __init__(self, teacher, die_after: int | None = None, wait_for: Path | None = None):
        self.rows, self.calls, self.die_after, self.wait_for = 0, 0, die_after, wait_for
        teacher.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.rows += kwargs["input_ids"].shape[0]
        self.calls += 1
        if self.die_after is not None and self.calls == self.die_after:
            while not any(self.wait_for.glob("*-00000-of-00002.shard.json")):  # shard 0 complete
                time.sleep(0.05)
            os._exit(3)


def main(out: str, *steps: str) -> None:
    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    for number, step in enumerate(steps):
        mode, folder = step.split(":", 1)
        teacher, data = teacher_and_data()
        if mode == "formats":
            teacher = masked_lm_teacher()
        cache_dir = Path(folder)
        dying = mode == "die" and state.process_index == 1
        counter = RowCounter(teacher, die_after=2 if dying else None, wait_for=cache_dir)
        if mode == "unshared":
            cache_dir = cache_dir / f"rank{state.process_index}"
        values, counts, error = np.zeros(0), np.zeros(0), ""
        try:
            if mode == "formats":
                values, counts = formats(teacher, data, cache_dir)
            else:
                result = precompute_teacher_logits(
                    teacher,
                    data,
                    cache_dir=cache_dir,
                    dtype="float32",
                    sort_window=SORT_WINDOW,
                    max_batch_size=4,
                )
                values = np.asarray(result.with_format("numpy")["teacher_logits"])
        except Exception as err:  # noqa: BLE001 - the test reads it
            if mode != "unshared":
                raise
            error = f"{type(err).__name__}: {err}"
        np.savez(
            Path(out) / f"{number}-rank{state.process_index}.npz",
            values=values,
            counts=counts,
            rows=counter.rows,
            error=error,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_worker()
