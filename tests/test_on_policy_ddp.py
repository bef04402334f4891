"""On-policy distillation under DDP (two CPU processes, Accelerate's CPU multi-process mode): each process generates
for its own prompts, and the loss is normalised by the completion tokens of both processes, so that two processes
train the student as one does on the same global batch and completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from instruct_fixtures import tiny_llama
from launch import accelerate_launch
from test_on_policy import instruction_rows

SCRIPT = Path(__file__).parent / "ddp_on_policy.py"
pytestmark = pytest.mark.slow  # each launch starts 1 or 2 fresh processes (15-60 s here)


def _launch(out: Path, processes: int, mode: str) -> list[dict]:
    accelerate_launch(
        [SCRIPT, out, 8 // processes, mode],
        processes=processes,
        log_dir=out.parent / f"logs-{out.name}",
        timeout=600,
    )
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert all(r["num_processes"] == processes for r in records)
    return records


def _dataset_prompts() -> list[tuple[int, ...]]:
    data = instruction_rows(8)
    prompts = [tuple(p) for p in data["prompt_input_ids"]]
    assert len(set(prompts)) == 8  # distinct, so which process saw which is unambiguous
    return prompts


def _check_each_process_generates_for_its_own_prompts(records: list[dict]) -> None:
    everything = sorted(_dataset_prompts())
    for step in range(2):
        seen = [[tuple(p) for p in r["prompts"][step]] for r in records]
        assert all(len(s) == 4 for s in seen)  # one generation call of its 4 prompts per process and step
        assert not set(seen[0]) & set(seen[1]), f"step {step}: both processes generated for the same prompts"
        assert sorted(seen[0] + seen[1]) == everything, f"step {step}: the two processes missed prompts"


def _check_normaliser_is_the_sum_over_processes(records: list[dict]) -> None:
    for step in range(2):
        local = [r["local_tokens"][step] for r in records]
        assert all(local), local
        for r in records:
            assert r["num_items_in_batch"][step] == sum(local), (step, local, r["num_items_in_batch"])


def test_each_process_samples_for_its_own_prompts_and_normalises_by_all_tokens(tmp_path):
    records = _launch(tmp_path / "sampled", 2, "sampled")
    _check_each_process_generates_for_its_own_prompts(records)
    _check_normaliser_is_the_sum_over_processes(records)
    assert [r["student_completions"] for r in records] == [8, 8]  # 2 steps x 4 prompts on each process
    trained = torch.load(tmp_path / "sampled" / "student.pt")
    initial = tiny_llama(1).state_dict()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)


def test_two_processes_train_as_one_on_the_same_completions(tmp_path):
    """With the completions written from the prompts alone (of different lengths, so the two processes count
    different numbers of tokens), two processes of 4 prompts give one process's update on all 8, to 1e-5: a
    per-process normaliser would weigh a token of the process with fewer tokens more."""
    one = _launch(tmp_path / "one", 1, "fixed")
    two = _launch(tmp_path / "two", 2, "fixed")
    _check_each_process_generates_for_its_own_prompts(two)
    _check_normaliser_is_the_sum_over_processes(two)
    assert (
        two[0]["local_tokens"] != two[1]["local_tokens"]
    )  # the test can tell a sum from a per-process count
    assert one[0]["num_items_in_batch"] == two[0]["num_items_in_batch"]
    a, b = torch.load(tmp_path / "one" / "student.pt"), torch.load(tmp_path / "two" / "student.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
