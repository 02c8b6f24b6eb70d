"""Atomic file writes, and the removal of what killed runs left behind.

Every file the app writes (NIfTI, JSON, HTML, figures, checkpoints, model files, HDF5 patch
stores) is first written to a hidden temporary sibling in the same folder,
``.<name>.tmp<pid>`` (``.<stem>.tmp<pid>.nii.gz`` where the writer needs the extension), and
then renamed over the real name with :func:`os.replace`, which is atomic within one file
system.  A run killed mid-write therefore leaves the previous file or the new one under the
real name, never half a file; at most the hidden temporary remains.  Those temporaries are
removed by the next run that takes the folder's lock (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from ..errors import UserError

__all__ = ["TMP_PATTERN", "OutputExistsError", "check_overwrite", "tmp_sibling", "atomic_output",
           "write_text_atomic", "write_json_atomic", "remove_stale_temporaries"]

LOGGER = logging.getLogger(__name__)

#: names of the temporaries made by :func:`tmp_sibling` (with or without a kept extension)
TMP_PATTERN = re.compile(r"^\..+\.tmp\d+(?:\.[A-Za-z0-9]+){0,2}$")

_DOUBLE_EXTENSIONS = (".nii.gz", ".tar.gz")


def _split_extension(name: str) -> tuple[str, str]:
    for ext in _DOUBLE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return os.path.splitext(name)


def tmp_sibling(path: str | os.PathLike, *, keep_extension: bool = False) -> str:
    """The hidden temporary sibling of ``path`` used by this process.

    ``keep_extension`` keeps the file's extension last (``.x.tmp123.nii.gz``), for writers
    that choose the format from it (nibabel, matplotlib).
    """
    folder, name = os.path.split(os.fspath(path))
    if keep_extension:
        stem, ext = _split_extension(name)
        return os.path.join(folder, f".{stem}.tmp{os.getpid()}{ext}")
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike, *, keep_extension: bool = False,
                  fsync: bool = False) -> Iterator[str]:
    """Yield a temporary name to write ``path`` through; rename it over ``path`` when the
    block ends without an exception, remove it otherwise.

    ``fsync`` flushes the file to disk before the rename makes it visible (for files whose
    loss after a power cut would matter, such as model weights).
    """
    path = os.fspath(path)
    tmp = tmp_sibling(path, keep_extension=keep_extension)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class OutputExistsError(UserError, FileExistsError):
    """An output exists and ``--overwrite`` was not given."""


def check_overwrite(path: str | os.PathLike, overwrite: bool) -> None:
    """An :class:`OutputExistsError` when ``path`` exists and ``overwrite`` is false."""
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{os.fspath(path)} exists; use --overwrite to replace it")


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``.  A file that already
    holds exactly ``text`` is left alone (its modification time too), so a rerun does not
    touch outputs it would not change."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return path
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return path


def write_json_atomic(path: str | os.PathLike, data: Mapping, *, sort_keys: bool = True,
                      overwrite: bool = True) -> str:
    """Write ``data`` as indented JSON (values JSON cannot hold as their ``str``) to ``path``
    atomically, making its folder if needed; returns ``path``.

    Raises
    ------
    OutputExistsError
        when ``path`` exists and ``overwrite`` is false.
    """
    check_overwrite(path, overwrite)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_text_atomic(path, text)


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True,
                             prefix: str = "") -> list[str]:
    """Remove the temporaries (:data:`TMP_PATTERN`) that killed runs left in ``folder``.

    Call it only while holding the lock that keeps other runs from writing there: a live
    run's temporary looks the same.  ``prefix`` restricts the removal to temporaries of files
    whose names start with it (``.<prefix>…``).  Returns the removed paths.
    """
    folder = os.fspath(folder)
    removed: list[str] = []
    if not os.path.isdir(folder):
        return removed
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for root, _dirs, files in walker:
        for name in files:
            if TMP_PATTERN.match(name) and name.startswith("." + prefix):
                path = os.path.join(root, name)
                if os.path.isfile(path) or os.path.islink(path):
                    os.remove(path)
                    removed.append(path)
                    LOGGER.info("removed %s, left by a killed run", path)
    return removed
