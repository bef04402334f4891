"""The fused causal-LM loss on sharded students and teachers (hf_distill.sharding), 2 CPU processes on gloo,
against one process on the same batches.

FSDP2: ``tests/fsdp2_fused.py`` on torchrun (Accelerate's Trainer refuses FSDP on the CPU).
ZeRO-3: ``tests/zero3_train.py`` through ``accelerate launch`` with ``tests/zero3_cpu.yaml``, and with
``tests/zero3_offload_cpu.yaml`` (parameters and optimizer offloaded to the CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import accelerate_launch, free_port

HERE = Path(__file__).parent


def _torchrun(script: Path, out: Path, *args: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), str(script), str(out), *args]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["own-head-resharded", "tied-head-in-root"])
def test_fsdp2_fused_loss_and_step_equal_one_process(tmp_path, tie):
    ranks = _torchrun(HERE / "fsdp2_fused.py", tmp_path, *(["--tie"] if tie else []))
    for result in ranks:
        torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=0, atol=1e-5)
        assert result["state"].keys() == result["ref_state"].keys()
        for key, value in result["ref_state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["own-head-resharded", "tied-head-in-root"])
def test_fsdp2_sliced_fused_loss_and_step_equal_one_process(tmp_path, tie):
    """Both heads read in 3 vocabulary slices on 2 ranks (96 rows, 48 a rank: the middle slice spans both),
    against the whole heads in one process: the loss, and the weights after one AdamW step."""
    ranks = _torchrun(HERE / "fsdp2_fused.py", tmp_path, "--slices", "3", *(["--tie"] if tie else []))
    for (
        result
    ) in ranks:  # a resharded head is gathered a slice at a time; the root's stays whole after its forward
        assert result["head"] == ("HeadSlices" if tie else "ShardedHeadSlices")
        torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=0, atol=1e-5)
        assert result["state"].keys() == result["ref_state"].keys()
        for key, value in result["ref_state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_head_slices_route_each_ranks_scaled_gradient(tmp_path, engine):
    """tests/sharded_slices.py: 23-row heads on 2 ranks in 5 slices, jsd + CE, each rank its own positions and grad
    output: the loss and hidden gradient of chunked_lm_losses on the whole heads, and the head's gradient: under
    FSDP2 (12 + 11 rows) the local rows averaged over the ranks; under ZeRO-3 (flat partitions split inside row 11)
    the rank's own whole gradient, for ZeRO-3's hook to reduce-scatter."""
    ranks = _torchrun(HERE / "sharded_slices.py", tmp_path, engine)
    shapes = {"fsdp2": [(12, 6), (11, 6)], "zero3": [(23, 6), (23, 6)]}[engine]
    assert [tuple(r["head_grad"].shape) for r in ranks] == shapes
    for result in ranks:
        for name in ("loss", "hidden_grad", "head_grad"):
            torch.testing.assert_close(result[name], result["ref_" + name], rtol=1e-5, atol=1e-6, msg=name)


def _zero3_run(
    out: Path,
    processes: int,
    source: str,
    config: str = "zero3_cpu.yaml",
    slices: int = 1,
    head: str = "tied",
) -> dict:
    """tests/zero3_train.py on one CPU process (global batch 4), or on 2 under ZeRO-3 (2 rows each) with the
    accelerate ``config`` of tests/, the heads read in ``slices`` vocabulary slices (``lm_vocab_slices``), the
    student's head ``tied`` to its input embedding or not."""
    env = {"PYTHONPATH": str(HERE.parent)}
    if processes == 1:
        script = [HERE / "zero3_train.py", out, 4, source, slices, head]
        accelerate_launch(script, processes=1, log_dir=out.parent, env=env)
    else:  # the config's DEEPSPEED, not launch.py's --multi_gpu
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(HERE / config),
        ]
        command += ["--num_processes", "2", "--main_process_port", str(free_port())]
        command += [str(HERE / "zero3_train.py"), str(out), "2", source, str(slices), head]
        env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(  # from the repository root, where an accelerate config's paths start
            command, capture_output=True, text=True, timeout=400, env={**os.environ, **env}, cwd=HERE.parent
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(out / "student.pt")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each teacher source and student head (whole heads, ``lm_vocab_slices=1``), made once
    for this module."""
    runs = {}

    def run(source: str, head: str = "tied") -> dict:
        if (source, head) not in runs:
            out = tmp_path_factory.mktemp(f"one-{source}-{head}") / "out"
            runs[source, head] = _zero3_run(out, 1, source, head=head)
        return runs[source, head]

    return run


def _assert_zero3_equals_one_process(two: dict, one: dict) -> None:
    """The 2-process ZeRO-3 run really partitioned the student's head (no whole copy kept, ``ds_persist``), and its
    loss at each of the 3 steps and its gathered weights after them equal the one-process run's to 1e-5."""
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["sharded"] and not one["sharded"] and not two["persistent"]
    assert len(one["losses"]) == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("slices", [1, 3], ids=["whole-heads", "3-vocab-slices"])
@pytest.mark.parametrize(
    ("source", "head"), [("live", "tied"), ("live", "untied"), ("topk", "tied"), ("sampled", "tied")]
)
def test_zero3_fused_training_equals_one_process(tmp_path, one_process, source, head, slices):
    """ZeRO-3 on 2 ranks, the heads gathered whole or read in 3 vocabulary slices (Zero3HeadSlices: 96 rows of 32,
    48 rows a rank, the middle slice spans both), against whole heads in one process. A tied head's gradient is
    accumulated once the embedding's backward has regathered it; an untied one is still an empty placeholder then."""
    pytest.importorskip("deepspeed")
    two = _zero3_run(tmp_path / "two", 2, source, slices=slices, head=head)
    assert two["teacher_sharded"] == (source == "live")  # a live teacher is sharded too
    _assert_zero3_equals_one_process(two, one_process(source, head))


@pytest.mark.slow
@pytest.mark.parametrize("slices", [1, 3], ids=["whole-heads", "3-vocab-slices"])
def test_zero3_offloaded_to_cpu_fused_training_equals_one_process(tmp_path, one_process, slices):
    """offload_param and offload_optimizer on the CPU: the gathers (or the slices' broadcasts) read offloaded
    partitions, and the head's gradient reaches the offloaded optimizer. On this CPU both sides of the offload are
    host memory; on GPUs DeepSpeed's gather brings the partitions to the device as for its own forward, and a slice's
    owner copies its part to the device before broadcasting it (not run here)."""
    pytest.importorskip("deepspeed")
    two = _zero3_run(tmp_path / "two", 2, "live", config="zero3_offload_cpu.yaml", slices=slices)
    assert two["teacher_sharded"]
    assert two["offload"] == {"param": True, "optimizer": True, "optimizer_class": "SGD"}
    _assert_zero3_equals_one_process(two, one_process("live"))
