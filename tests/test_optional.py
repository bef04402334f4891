"""A missing optional package stops the run with one line naming the pip install that fixes it."""

from __future__ import annotations

import sys

import pytest

from hf_distill.errors import InputError
from hf_distill.optional import MissingPackageError, require, require_gguf


def test_require_returns_the_module():
    import json

    assert require("json", "Reading JSON") is json


def test_a_missing_package_names_its_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed now raises ImportError
    with pytest.raises(MissingPackageError) as info:
        require("deepspeed", "A DeepSpeed run")
    assert isinstance(info.value, InputError) and isinstance(info.value, ImportError)
    assert str(info.value).startswith(
        "A DeepSpeed run needs the package `deepspeed`: pip install 'deepspeed' ("
    )
    assert "\n" not in str(info.value)


def test_the_pip_name_and_minimum_version_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(MissingPackageError, match=r"pip install 'liger-kernel>=0.5'"):
        require("liger_kernel", "The fused loss", pip_name="liger-kernel", min_version="0.5")


def test_an_installed_package_older_than_needed_is_refused():
    import packaging

    with pytest.raises(MissingPackageError, match=r"installed: packaging==") as info:
        require("packaging", "X", min_version="9999")
    assert "pip install 'packaging>=9999'" in str(info.value)
    assert require("packaging", "X", min_version="1.0") is packaging


def test_a_gguf_teacher_without_gguf_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(
        MissingPackageError, match=r"^My teacher needs the package `gguf>=0.10.0`: pip install"
    ):
        require_gguf("My teacher")
