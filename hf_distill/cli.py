"""Running a script's ``main``: the user's mistakes as one ``error:`` line, our bugs with their traceback; and
the ``main`` of an application's script (parse the recipe and flags, run, print the table)."""

from __future__ import annotations

import inspect
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import PartialState

from .errors import InputError
from .recipe import RecipeParser

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_DISTILL_DEBUG"
EXIT_INPUT_ERROR = 2  # what argparse exits with for a bad flag


def _script_name(main: Callable[..., Any]) -> str:
    try:
        return Path(inspect.getfile(main)).name
    except TypeError:  # a builtin or a callable object without a source file
        return Path(sys.argv[0]).name


def error_line(prog: str, err: BaseException) -> str:
    """``<prog>: error: <message>``, the message on one line."""
    message = " ".join(str(err).split())
    return f"{prog}: error: {message}"


def run_script(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """``main(argv)``; an :class:`~hf_distill.errors.InputError` becomes one line on stderr and exit code 2.

    ``argv`` defaults to ``sys.argv[1:]``. ``--debug`` (taken out of ``argv`` before ``main`` sees it) or the
    environment variable ``HF_DISTILL_DEBUG=1`` lets the error through with its traceback. Any other exception
    (a bug, an out-of-memory, an interrupt) is never caught here.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return main(argv)
    except InputError as err:
        if debug:
            raise
        print(error_line(_script_name(main), err), file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_ERROR)


def run_application(
    script: str,
    argv: list[str] | None,
    parser: RecipeParser,
    run: Callable[..., dict[str, Any]],
    format_table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The ``main`` of an application's script (``script``, its path as the cards' launch line shows it).

    ``argv`` (default ``sys.argv[1:]``) is parsed by ``parser.parse_recipe_and_args`` into the script's and the
    training arguments; ``run(script_args, training_args, recipe=..., launch_command=...)`` returns the summary
    (``results.json``), whose ``format_table`` the main process prints with the path of ``results.json``.
    """
    argv = sys.argv[1:] if argv is None else argv
    script_args, training_args = parser.parse_recipe_and_args(argv)
    check_process_group(training_args)
    summary = run(
        script_args, training_args, recipe=recipe_of(argv), launch_command=launch_line(script, argv)
    )
    if PartialState().is_main_process:
        print("\n" + format_table(summary) + "\n", flush=True)
        print(f"Results: {training_args.output_dir}/results.json", flush=True)
    return summary


def check_process_group(training_args: Any) -> None:
    """Refuse, in one line, processes that ``accelerate launch`` started but that form no process group.

    On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N`` starts N processes that join a
    gloo group only when the run asks for the CPU (``use_cpu``); otherwise each sees a world of one and runs the
    whole job alone, and they overwrite one another's teacher, caches and results.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and training_args.world_size == 1:
        raise InputError(
            f"accelerate launch started {launched} processes, but they form no process group (no GPU, and "
            "use_cpu is not set), so each would run the whole job alone over the same files: on CPUs pass "
            "--use_cpu true (or use_cpu: true in the recipe), or run one process with python."
        )


def recipe_of(argv: list[str]) -> str | None:
    """The ``--config`` recipe path in ``argv``, if any."""
    return argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None


def launch_line(script: str, argv: list[str]) -> str:
    """The command that reproduces this run (for the cards): ``accelerate launch`` when under it, else ``python``."""
    # `accelerate launch` exports ACCELERATE_MIXED_PRECISION to the processes it starts.
    launcher = ["accelerate", "launch"] if "ACCELERATE_MIXED_PRECISION" in os.environ else ["python"]
    return shlex.join([*launcher, script, *argv])
