"""Kill and resume: a run killed with SIGKILL after a checkpoint, resumed with
``trainer.train(resume_from_checkpoint=...)``, ends with the weights of an uninterrupted run.

On one CPU process with a fixed seed the data order and every operation repeat, so the weights are
compared bit for bit. The four setups (``resume_train.py``): a live teacher, cached logits, the
hidden-state loss with its projection (student width != teacher width) and an ensemble of two teachers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from resume_train import SETUPS, final_state, make_trainer

from hf_distill.trainer import HIDDEN_PROJECTION_NAME

SCRIPT = Path(__file__).parent / "resume_train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_same(resumed: dict[str, torch.Tensor], uninterrupted: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_train_resumes_from_a_checkpoint_to_the_uninterrupted_weights_and_projection(tmp_path):
    # The fast, in-process version of the slow SIGKILL test below, through Trainer.train itself: the
    # student, the projection and (AdamW, learning rate 1e-2) both their optimizer states must come back.
    whole = make_trainer("hidden", tmp_path / "a")
    whole.args.max_steps, whole.args.save_steps = 4, 2
    whole.train()
    uninterrupted = final_state(whole)
    checkpoint = tmp_path / "a" / "run" / "checkpoint-2"
    assert (checkpoint / HIDDEN_PROJECTION_NAME).is_file()

    resumed = make_trainer("hidden", tmp_path / "b")  # a fresh student and projection
    resumed.args.max_steps, resumed.args.save_steps = 4, 2
    assert not torch.equal(resumed.hidden_projection.weight, uninterrupted["projection.weight"])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert_same(final_state(resumed), uninterrupted)
    initial = final_state(make_trainer("hidden", tmp_path / "c"))
    assert not torch.equal(initial["projection.weight"], uninterrupted["projection.weight"])


def test_resume_without_the_projection_file_is_refused(tmp_path):
    trainer = make_trainer("hidden", tmp_path / "a")
    trainer.args.max_steps = 1
    trainer.train()
    checkpoint = tmp_path / "a" / "run" / "checkpoint-1"
    (checkpoint / HIDDEN_PROJECTION_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=HIDDEN_PROJECTION_NAME):
        make_trainer("hidden", tmp_path / "b").train(resume_from_checkpoint=str(checkpoint))


def _run(setup: str, out: Path, resume: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), setup, str(out), *([str(resume)] if resume else [])]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def _killed_after_first_checkpoint(setup: str, out: Path) -> Path:
    """Start a run, SIGKILL it once checkpoint-2 is complete (its trainer_state.json written)."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), setup, str(out)],
        env={**ENV, "SLOW_STEP_SECONDS": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = out / "run" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr}"
    assert state.exists(), stderr
    assert not (out / "final.pt").exists()
    return out / "run" / "checkpoint-2"


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, setup):
    whole = _run(setup, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    checkpoint = _killed_after_first_checkpoint(setup, tmp_path / "killed")
    resumed = _run(setup, tmp_path / "killed", resume=checkpoint)
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = torch.load(tmp_path / "whole" / "final.pt")
    assert_same(torch.load(tmp_path / "killed" / "final.pt"), uninterrupted)
    if setup == "hidden":
        assert any(k.startswith("projection.") for k in uninterrupted)
    initial = final_state(make_trainer(setup, tmp_path / "init"))
    assert any(not torch.equal(initial[k], uninterrupted[k]) for k in initial), "training did not move"
