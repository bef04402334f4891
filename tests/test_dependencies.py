"""The packages a fresh install needs for the defaults are declared, and installed here.

The offline LM default's teacher (``offline:smollm2-135m``) is a GGUF file that transformers reads with the
``gguf`` package; a fresh ``pip install -e '.[test]'`` must bring it (issue #23).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from transformers.utils import import_utils

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared() -> dict[str, Requirement]:
    with open(PYPROJECT, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return {req.name.lower(): req for req in map(Requirement, dependencies)}


def test_gguf_is_a_runtime_dependency_at_transformers_minimum():
    declared = _declared()
    assert "gguf" in declared, "gguf (needed to load offline:smollm2-135m) is not in project.dependencies"
    minimum = Version(import_utils.GGUF_MIN_VERSION)
    assert all(not spec.contains(str(v)) for spec in declared["gguf"].specifier for v in [_below(minimum)])
    assert declared["gguf"].specifier.contains(str(minimum))


def _below(version: Version) -> Version:
    return Version(f"{version.major}.{version.minor - 1}.0" if version.minor else f"{version.major - 1}.99.0")


def test_gguf_is_installed_at_a_version_transformers_accepts():
    # transformers raises "Please install torch and gguf>=..." when this is false.
    assert import_utils.is_gguf_available(), "gguf is missing or too old: pip install -e '.[test]'"
