"""The folders a run writes: the output folder and Nipype's work folder.

Both are checked before anything is read or written, so that a folder the user cannot write
ends the run with one line that names it and says what to do (inside a container the usual
cause is the image's user against a bind mount of the host, see docs/containers.md), instead
of a traceback from the first file written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import CLIError

__all__ = ["FolderError", "default_work_dir", "check_writable_folder", "write_hint"]


class FolderError(CLIError):
    """An output or work folder that this user cannot create or write."""


def default_work_dir(out_dir: Path) -> Path:
    """The work folder of runs into ``out_dir`` without ``-w``: named after the output folder,
    in the system temporary directory."""
    digest = hashlib.sha1(str(out_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"bids_qsmnet_work_{digest}"


def write_hint(container: str | None, uid: int | None = None) -> str:
    """What to do about a folder this user cannot write, where the command runs.

    >>> write_hint(None)
    'choose a folder you can write, or change its permissions'
    >>> write_hint("singularity")
    'bind (-B) a folder you can write there'
    """
    uid = os.getuid() if uid is None else uid
    if container == "docker":
        return (f'run the container as the folder\'s owner (docker/podman run --user '
                f'"$(id -u):$(id -g)"), or bind-mount a folder that uid {uid} can write')
    if container == "singularity":  # Apptainer runs as the caller
        return "bind (-B) a folder you can write there"
    return "choose a folder you can write, or change its permissions"


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_writable_folder(path: Path, what: str, *, container: str | None = None) -> None:
    """Raise :class:`FolderError` unless this process can write ``path`` or create it.

    ``path`` need not exist: then its nearest existing ancestor must be a folder this
    process can write into.  Nothing is created.

    Parameters
    ----------
    path : folder that the run will write
    what : how the message names it (``output_dir``, ``the work dir (-w)``)
    container : ``docker`` or ``singularity`` inside an image (``BIDS_QSMNET_CONTAINER``)
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FolderError(f"{what} {path}: {existing} is a file, not a folder")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    where = f"{what} {path}" if existing == path else \
        f"{what} {path} cannot be created: {existing}"
    uid = os.getuid()
    if _read_only_fs(existing):
        raise FolderError(f"{where} is on a read-only file system; " + (
            "bind-mount a folder read-write there (no :ro)" if container else
            "choose a folder on a writable file system"))
    st = existing.stat()
    raise FolderError(f"{where} is not writable by uid {uid} (owner uid {st.st_uid}, mode "
                      f"{st.st_mode & 0o7777:o}); {write_hint(container, uid)}")
