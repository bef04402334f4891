"""The error for input the user can fix: a recipe value, a data file, a label, a cache, a Hub token.

:class:`InputError` is a ``ValueError`` (so ``except ValueError`` and ``pytest.raises(ValueError)`` still
catch it) whose message says what was wrong and how to fix it. Scripts run their ``main`` through
:func:`hf_distill.cli.run_script`, which prints such an error as one ``<script>: error: <message>`` line and
exits with code 2, as argparse does for a mistyped flag. Any other exception is a bug of ours and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class InputError(ValueError):
    """The user's input was refused: the message says what was wrong, what was expected and how to fix it."""


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Inside, an ``OSError`` (no such path, a Hub id that does not exist or cannot be reached, no access) is
    the user's to fix: re-raised as :class:`InputError` naming ``what``, the original chained."""
    try:
        yield
    except OSError as err:
        raise InputError(f"Cannot read {what}: {type(err).__name__}: {err}") from err


class MissingFileError(InputError, FileNotFoundError):
    """A file the user's input points at is not there (a checkpoint's part, a cache's shard): an
    :class:`InputError` that ``except FileNotFoundError`` still catches."""
