"""Two CPU processes (Accelerate's CPU multi-process mode) train the same student as one process
with the same global batch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from launch import LaunchFailed, accelerate_launch

SCRIPT = Path(__file__).parent / "ddp_train.py"


def _launch(out: Path, processes: int, per_device_batch: int) -> dict[str, torch.Tensor]:
    # On a machine without GPUs, `--multi_gpu` starts torchrun processes on the gloo backend and
    # the script's `use_cpu=True` keeps them on the CPU: Accelerate's CPU multi-process mode.
    accelerate_launch(
        [SCRIPT, out, per_device_batch],
        processes=processes,
        log_dir=out.parent / f"logs-{out.name}",
        timeout=300,
    )
    saved = torch.load(out / "student.pt")
    assert saved["num_processes"] == processes
    return saved["state"]


def test_two_processes_match_one_process(tmp_path):
    one = _launch(tmp_path / "one", processes=1, per_device_batch=8)
    two = _launch(tmp_path / "two", processes=2, per_device_batch=4)
    initial = tiny_bert(seed=2, num_layers=2).state_dict()
    assert any(not torch.allclose(one[k], initial[k]) for k in initial), "training did not move the student"
    assert {"projection.weight", "projection.bias"} <= set(one)  # averaged across processes by the trainer
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)


_DIES_ON_RANK_1 = """
from accelerate import PartialState

state = PartialState(cpu=True)
with state.main_process_first():  # rank 0 waits here for rank 1, which dies first
    if state.process_index == 1:
        raise RuntimeError("rank 1 broke: the message the report must show")
"""


@pytest.mark.slow
def test_a_failing_rank_shows_its_own_traceback(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(textwrap.dedent(_DIES_ON_RANK_1))
    with pytest.raises(LaunchFailed) as failed:
        accelerate_launch([script], processes=2, log_dir=tmp_path / "logs", timeout=300)
    report = str(failed.value)
    assert "---- rank 1 stderr" in report
    rank_1 = report.split("---- rank 1 stderr")[1].split("---- ")[0]
    assert "Traceback" in rank_1 and "rank 1 broke: the message the report must show" in rank_1
