"""Two CPU processes (Accelerate's CPU multi-process mode) train the same student as one process
with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_bert

SCRIPT = Path(__file__).parent / "ddp_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, processes: int, per_device_batch: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # On a machine without GPUs, `--multi_gpu` starts torchrun processes on the gloo backend and
    # the script's `use_cpu=True` keeps them on the CPU: Accelerate's CPU multi-process mode.
    mode = ["--multi_gpu", "--main_process_port", str(_free_port())] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run(
        [*command, str(SCRIPT), str(out), str(per_device_batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(out / "student.pt")
    assert saved["num_processes"] == processes
    return saved["state"]


def test_two_processes_match_one_process(tmp_path):
    one = _launch(tmp_path / "one", processes=1, per_device_batch=8)
    two = _launch(tmp_path / "two", processes=2, per_device_batch=4)
    initial = tiny_bert(seed=2, num_layers=2).state_dict()
    assert any(not torch.allclose(one[k], initial[k]) for k in one), "training did not move the student"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
