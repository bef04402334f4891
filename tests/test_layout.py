"""The library (``hf_distill``) never imports the application (``hf_distill.text_classification``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_distill"
APPLICATION = "text_classification"
LIBRARY_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if APPLICATION not in p.relative_to(PACKAGE).parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``hf_distill``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "hf_distill." * (node.level > 0) + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}".replace("..", ".") for alias in node.names)
    return names


def test_the_library_modules_are_found():
    assert {p.relative_to(PACKAGE).with_suffix("").as_posix() for p in LIBRARY_MODULES} >= {
        "config",
        "losses",
        "trainer",
        "teacher_cache/key",
        "teacher_cache/precompute",
        "model_card",
        "hub",
    }


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_library_module_does_not_import_the_application(path):
    offending = sorted(n for n in imported_modules(path) if APPLICATION in n.split("."))
    assert not offending, f"{path.name} imports the application: {offending}"


def test_the_rule_sees_both_import_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .text_classification import run\nimport hf_distill.text_classification.data\n")
    assert {"hf_distill.text_classification.run", "hf_distill.text_classification.data"} <= imported_modules(
        bad
    )


def test_importing_the_library_loads_no_application_module():
    code = "import sys, hf_distill; print(sorted(m for m in sys.modules if 'text_classification' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
