"""run_script: the user's mistakes as one error line and exit code 2; --debug and bugs keep the traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hf_distill.cli import run_script
from hf_distill.errors import InputError


def refuse(argv):
    raise InputError(f"no such file {argv[0]!r}.\nGive an existing path.")


def crash(argv):
    raise KeyError("a bug")


def test_an_input_error_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exited:
        run_script(refuse, ["x.csv"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["test_cli.py: error: no such file 'x.csv'. Give an existing path."]


def test_debug_flag_and_env_let_the_error_through(monkeypatch):
    seen = []
    with pytest.raises(InputError):
        run_script(lambda argv: seen.append(argv) or refuse(["x"]), ["--debug", "--a", "1"])
    assert seen == [["--a", "1"]]  # main never sees --debug
    monkeypatch.setenv("HF_DISTILL_DEBUG", "1")
    with pytest.raises(InputError):
        run_script(refuse, ["x"])


def test_a_bug_keeps_its_exception(capsys):
    with pytest.raises(KeyError):
        run_script(crash, [])
    assert capsys.readouterr().err == ""


def test_returns_what_main_returns():
    assert run_script(lambda argv: argv, ["--a"]) == ["--a"]


def test_a_script_prints_no_traceback(tmp_path):
    script = tmp_path / "myscript.py"
    script.write_text(
        textwrap.dedent(
            """
            from hf_distill.cli import run_script
            from hf_distill.errors import InputError

            def main(argv):
                raise InputError("bad value")

            if __name__ == "__main__":
                run_script(main)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "myscript.py: error: bad value\n")
    debug = subprocess.run([sys.executable, str(script), "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
