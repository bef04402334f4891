"""``accelerate launch`` for tests: on failure, the whole output and every rank's own log.

A multi-process run that fails usually fails on one rank first; the others then die waiting for it
(``Connection closed by peer`` in a barrier), and the tail of the launcher's stderr shows only that.
:func:`accelerate_launch` passes torchrun's ``--log_dir`` and ``--tee 3`` through ``accelerate launch``,
so each rank's stdout and stderr also land in ``<log_dir>/.../attempt_0/<rank>/{stdout,stderr}.log``;
when the command fails, :class:`LaunchFailed` carries the command, the exit status, each rank's
complete stderr (its traceback) and the launcher's complete output, untruncated.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


class LaunchFailed(AssertionError):
    """An ``accelerate launch`` that exited non-zero; the message holds everything each rank wrote."""


def leave_worker() -> None:
    """End a launched test worker once its work is written: leave the process group, flush, and exit 0 without the
    interpreter's teardown. With deepspeed installed (CI installs it), about 1 run in 7 aborted in that teardown
    after all its work was done ("terminate called without an active exception"; 0 of 12 without deepspeed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, log_dir: Path, launch_args: Sequence[str] = ()) -> list[str]:
    """``python -m accelerate.commands.launch`` with ``processes`` CPU processes.

    On a machine without GPUs, ``--multi_gpu`` starts torchrun processes on the gloo backend; the
    script must ask for the CPU itself (``use_cpu=True``/``--use_cpu true``) so that a machine with a
    GPU runs the same thing. One process runs with ``--cpu`` (no torchrun, hence no rank logs).
    """
    if processes > 1:
        mode = [
            "--multi_gpu",
            "--main_process_port",
            str(free_port()),
            "--log_dir",
            str(log_dir),
            "--tee",
            "3",
        ]
    else:
        mode = ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes)]
    return [
        *command,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *launch_args,
    ]


def rank_logs(log_dir: Path) -> dict[str, str]:
    """``"rank R stderr"`` / ``"rank R stdout"`` -> the text torchrun wrote for that rank, ranks in order."""
    logs = {}
    for path in sorted(log_dir.rglob("*.log"), key=lambda p: (p.parent.name, p.name)):
        text = path.read_text(errors="replace")
        logs[f"rank {path.parent.name} {path.stem} ({path})"] = text
    return logs


def failure_report(command: Sequence[str], result: subprocess.CompletedProcess, log_dir: Path) -> str:
    parts = [f"`{' '.join(command)}` exited with {result.returncode}."]
    for name, text in rank_logs(log_dir).items():
        if text.strip():
            parts.append(f"---- {name} ----\n{text}")
    parts.append(f"---- launcher stdout ----\n{result.stdout}")
    parts.append(f"---- launcher stderr ----\n{result.stderr}")
    return "\n".join(parts)


def accelerate_launch(
    script: Sequence[str],
    *,
    processes: int,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    launch_args: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``accelerate launch [launch_args] script...`` on ``processes`` CPU processes.

    ``script``: the script's path and arguments. ``env`` is added to ``os.environ`` (one thread per
    process and no tokenizer threads by default). With ``check``, a non-zero exit raises
    :class:`LaunchFailed` with :func:`failure_report`.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [*launch_command(processes, log_dir, launch_args), *map(str, script)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LaunchFailed(failure_report(command, result, log_dir))
    return result
