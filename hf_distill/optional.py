"""Packages that only some runs need (gguf, deepspeed, liger-kernel, vllm): imported where they are used.

:func:`require` imports one; where it is missing (or older than the run needs) the run stops with one line
naming the ``pip install`` that fixes it (a :class:`MissingPackageError`, printed by
:func:`hf_distill.cli.run_script`), not an ``ImportError`` traceback from deep inside a library.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from packaging.version import Version

from .errors import InputError


class MissingPackageError(InputError, ImportError):
    """An optional package this run needs is not installed: an :class:`InputError` that
    ``except ImportError`` still catches."""


def require(
    module: str, what_for: str, *, pip_name: str | None = None, min_version: str | None = None
) -> ModuleType:
    """``import module``, or refuse with ``"<what_for> needs the package `<pip_name>`: pip install ..."``.

    ``pip_name`` is the distribution's name on PyPI (default ``module``); ``min_version`` the oldest one
    that works, checked against the installed distribution's metadata.
    """
    pip_name = pip_name or module
    wanted = f"{pip_name}>={min_version}" if min_version else pip_name
    fix = f"{what_for} needs the package `{wanted}`: pip install '{wanted}'"
    try:
        imported = importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(f"{fix} ({type(err).__name__}: {err}).") from err
    if min_version is not None:
        try:
            installed = importlib.metadata.version(pip_name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is not None and Version(installed) < Version(min_version):
            raise MissingPackageError(f"{fix} (installed: {pip_name}=={installed}).")
    return imported


# The oldest gguf transformers reads GGUF files with (transformers.utils.import_utils.GGUF_MIN_VERSION).
GGUF_MIN_VERSION = "0.10.0"


def require_gguf(what_for: str) -> ModuleType:
    """The ``gguf`` package transformers loads a GGUF checkpoint with."""
    return require("gguf", what_for, min_version=GGUF_MIN_VERSION)
