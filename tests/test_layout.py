"""The library (``hf_distill``) never imports an application (``text_classification``, ``language_modeling``),
and neither application imports the other: what both need lives in the library, once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_distill"
APPLICATION = "text_classification"
APPLICATIONS = ("text_classification", "language_modeling")
LIBRARY_MODULES = sorted(
    p for p in PACKAGE.rglob("*.py") if not set(APPLICATIONS) & set(p.relative_to(PACKAGE).parts)
)
APPLICATION_MODULES = {app: sorted((PACKAGE / app).rglob("*.py")) for app in APPLICATIONS}


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``path``'s own package."""
    package = ["hf_distill", *path.relative_to(root).parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
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
def test_library_module_does_not_import_an_application(path):
    offending = sorted(n for n in imported_modules(path) if set(APPLICATIONS) & set(n.split(".")))
    assert not offending, f"{path.name} imports an application: {offending}"


@pytest.mark.parametrize(
    ("app", "path"),
    [(app, p) for app, paths in APPLICATION_MODULES.items() for p in paths],
    ids=lambda v: v if isinstance(v, str) else v.relative_to(PACKAGE).as_posix(),
)
def test_an_application_does_not_import_the_other(app, path):
    other = next(a for a in APPLICATIONS if a != app)
    offending = sorted(n for n in imported_modules(path) if other in n.split("."))
    assert not offending, f"{path.relative_to(PACKAGE)} imports the {other} application: {offending}"


def test_both_applications_are_found():
    assert (
        len(APPLICATION_MODULES["language_modeling"]) >= 8
        and len(APPLICATION_MODULES["text_classification"]) >= 8
    )


def test_the_rule_sees_both_import_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .text_classification import run\nimport hf_distill.text_classification.data\n")
    assert {"hf_distill.text_classification.run", "hf_distill.text_classification.data"} <= imported_modules(
        bad, tmp_path
    )


def test_relative_imports_resolve_against_their_own_package(tmp_path):
    (tmp_path / "language_modeling").mkdir()
    module = tmp_path / "language_modeling" / "m.py"
    module.write_text("from . import offline\nfrom ..text_classification import data\n")
    names = imported_modules(module, tmp_path)
    assert "hf_distill.language_modeling.offline" in names and "hf_distill.text_classification.data" in names


def test_importing_the_library_loads_no_application_module():
    code = (
        "import sys, hf_distill; "
        "print(sorted(m for m in sys.modules if 'text_classification' in m or 'language_modeling' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trainer_routes_in_small_methods():
    """Issue 21's sizes: ``DistillationTrainer`` at most 400 lines, ``compute_loss`` at most 30, no method over 50,
    each counted from its ``def``/``class`` line to its last line (``ast``'s line numbers: docstrings, comments and
    blank lines inside included)."""
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DistillationTrainer"]
    methods = {n.name: n.end_lineno - n.lineno + 1 for n in trainer.body if isinstance(n, ast.FunctionDef)}
    assert trainer.end_lineno - trainer.lineno + 1 <= 400
    assert methods["compute_loss"] <= 30
    assert max(methods.values()) <= 50, max(methods.items(), key=lambda item: item[1])
