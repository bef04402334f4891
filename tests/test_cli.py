"""run_script: the user's mistakes as one error line and exit code 2; --debug and bugs keep the traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import load_module, random_classification_dataset, tiny_bert
from datasets import Dataset

from hf_distill.cli import run_script
from hf_distill.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


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


# ---- the scripts: a cache or a request the precompute script refuses ------------------------------


def _precompute():
    return load_module("scripts/precompute_teacher_logits.py")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(main, argv, capsys, prog: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_script(main, argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert errors[0].startswith(f"{prog}: error: ")
    return errors[0].removeprefix(f"{prog}: error: ")


@pytest.fixture
def teacher_and_data(tmp_path, tokenizer):
    tiny_bert(seed=1).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    random_classification_dataset(12).save_to_disk(str(tmp_path / "data"))
    return [
        "--teacher_model_name_or_path",
        str(tmp_path / "teacher"),
        "--dataset_path",
        str(tmp_path / "data"),
    ]


def test_precompute_without_logits_dir(teacher_and_data, capsys):
    message = _refused(_precompute().main, teacher_and_data, capsys, "precompute_teacher_logits.py")
    assert message == "--dataset_path needs --logits_dir: the directory the cache is written to."


def test_precompute_refuses_an_edited_cache_and_leaves_it(teacher_and_data, tmp_path, capsys):
    script = _precompute()
    argv = [*teacher_and_data, "--logits_dir", str(tmp_path / "logits")]
    script.main(argv)
    meta = next((tmp_path / "logits").glob("*.json"))
    provenance = json.loads(meta.read_text())
    meta.write_text(json.dumps({**provenance, "weights_hash": "0" * 64}))
    before = _snapshot(tmp_path / "logits")
    message = _refused(script.main, argv, capsys, "precompute_teacher_logits.py")
    assert "weights_hash: cache has '0000" in message and "Delete" in message
    assert _snapshot(tmp_path / "logits") == before


def test_precompute_of_an_untokenized_dataset(tmp_path, teacher_and_data, capsys):
    Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(str(tmp_path / "raw"))
    argv = [
        *teacher_and_data[:2],
        "--dataset_path",
        str(tmp_path / "raw"),
        "--logits_dir",
        str(tmp_path / "l"),
    ]
    message = _refused(_precompute().main, argv, capsys, "precompute_teacher_logits.py")
    assert "needs a tokenized dataset with an input_ids column, got columns ['text']" in message
    assert not (tmp_path / "l").exists() or not any((tmp_path / "l").iterdir())


def test_launched_processes_that_form_no_group_are_refused_in_one_line(monkeypatch):
    """``accelerate launch`` on CPUs without ``use_cpu``: WORLD_SIZE says 2, the training arguments a world of 1
    (each rank would run the whole job alone over the same files): refused before anything runs."""
    from types import SimpleNamespace

    from hf_distill.cli import check_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"^accelerate launch started 2 processes, but they form no process group .* pass --use_cpu true"):
        check_process_group(SimpleNamespace(world_size=1))
    check_process_group(SimpleNamespace(world_size=2))  # a real group
    monkeypatch.delenv("WORLD_SIZE")
    check_process_group(SimpleNamespace(world_size=1))  # one process, not launched
