"""Advisory folder locks: one run writes into an output or training folder at a time.

A lock is an ``flock`` on a hidden file in the folder, released when the holder ends (even
when it is killed).  Once a run holds a folder, no live run writes there: the hidden
temporaries of atomic writes found there were left by killed runs and are removed
(:func:`~bids_qsmnet.io.atomic.remove_stale_temporaries`).  On a file system without
``flock`` (e.g. Lustre mounted ``noflock``) a warning says that concurrent runs are not
detected, and the run goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import UserError
from .atomic import remove_stale_temporaries

LOGGER = logging.getLogger(__name__)

__all__ = ["OUTPUT_LOCK", "SUBJECT_LOCKS", "TRAINING_LOCK", "FolderLockedError",
           "TrainingLockedError", "output_lock", "training_lock", "remove_held_temporaries"]

#: lock file of an output folder (shared by runs restricted to some participants)
OUTPUT_LOCK = ".bids_qsmnet.lock"
#: folder of the per-participant lock files of an output folder
SUBJECT_LOCKS = ".bids_qsmnet.locks"
#: lock file of a training folder (removed when the run ends; a killed run's is taken over)
TRAINING_LOCK = ".bids_qsmnet_training.lock"


class FolderLockedError(UserError, RuntimeError):
    """Another run is writing into the same folder."""


class TrainingLockedError(FolderLockedError):
    """Another training run is writing into the same output folder."""


def _flock(path: str | os.PathLike, *, shared: bool = False) -> IO | None:
    """``path`` opened and locked without waiting; the open file holds the lock.

    Returns None (after a warning) where the file system cannot lock.  Raises
    ``BlockingIOError`` when another process holds the lock.
    """
    import fcntl

    fh = open(path, "a")
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise
    except OSError as exc:
        fh.close()
        LOGGER.warning("cannot lock %s (%s): concurrent runs are not detected", path, exc)
        return None
    return fh


def remove_held_temporaries(out_dir: Path, subjects: Iterable[str] | None = None) -> None:
    """Remove the temporaries that killed runs left in the part of ``out_dir`` a run holds.

    That part is the whole folder, or with ``subjects`` their folders and reports (the
    shared top-level files may be being written by a concurrent run of other subjects).
    """
    out_dir = Path(out_dir)
    if subjects:
        for subject in sorted(set(subjects)):
            remove_stale_temporaries(out_dir / f"sub-{subject}")
            remove_stale_temporaries(out_dir, recursive=False, prefix=f"sub-{subject}.")
        return
    remove_stale_temporaries(out_dir, recursive=False)
    for folder in sorted(out_dir.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and (
                folder.name.startswith("sub-") or folder.name in ("logs", "models")):
            remove_stale_temporaries(folder)


@contextmanager
def output_lock(out_dir: Path, subjects: Iterable[str] | None = None) -> Iterator[None]:
    """One run per output folder and participant at a time.

    A run of every participant holds the folder's lock exclusively; a run restricted to
    ``subjects`` shares it and holds one exclusive lock per participant, so that the tasks
    of a SLURM job array (one participant each) can write into one output folder.  The lock
    files stay (hidden): removing a lock file that another run has opened breaks locking.
    With the locks held, the temporaries of killed runs are removed from what they cover.

    Raises
    ------
    FolderLockedError
        when another run holds the folder or one of the participants.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = sorted(set(subjects or ()))
    held = []

    def take(path: Path, *, shared: bool, what: str) -> None:
        try:
            fh = _flock(path, shared=shared)
        except BlockingIOError:
            raise FolderLockedError(f"another bids_qsmnet run is writing {what} in {out_dir}; "
                                    "wait for it to finish or choose another output "
                                    "folder") from None
        if fh is not None:
            held.append(fh)

    try:
        take(out_dir / OUTPUT_LOCK, shared=bool(subjects), what="this output folder")
        if subjects:
            (out_dir / SUBJECT_LOCKS).mkdir(exist_ok=True)
        for subject in subjects:
            take(out_dir / SUBJECT_LOCKS / f"sub-{subject}.lock", shared=False,
                 what=f"sub-{subject}")
        remove_held_temporaries(out_dir, subjects)
        yield
    finally:
        for fh in reversed(held):
            fh.close()  # releases the lock


#: training locks held by this process: a forked child (a DataLoader worker) closes its
#: copies, so that the lock ends with the trainer even when the trainer is killed first
_HELD_TRAINING_LOCKS: list = []


def _close_locks_in_child() -> None:
    for fh in _HELD_TRAINING_LOCKS:
        try:
            fh.close()
        except OSError:
            pass
    _HELD_TRAINING_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _lock_current_file(path: str) -> IO | None:
    """Lock ``path`` and make sure the locked file is still the one named ``path``.

    The run that held the lock removes the file before it lets go: a run that locked the
    removed file retries on the new one.
    """
    while True:
        try:
            fh = _flock(path)
        except BlockingIOError:
            raise TrainingLockedError(
                f"another training run is writing into {os.path.dirname(path)}; wait for it "
                "to finish or choose another output folder") from None
        if fh is None:
            return None
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                return fh
        except FileNotFoundError:
            pass
        fh.close()


@contextmanager
def training_lock(out_dir: str) -> Iterator[None]:
    """Hold ``out_dir``'s training lock (:data:`TRAINING_LOCK`) while the block runs.

    With it held, the temporaries that killed runs left in ``out_dir`` are removed; the lock
    file is removed when the block ends.

    Raises
    ------
    TrainingLockedError
        when another training run holds the folder.
    """
    try:
        import fcntl  # noqa: F401  (POSIX only)
    except ImportError:  # not POSIX: no advisory locks
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TRAINING_LOCK)
    fh = _lock_current_file(path)
    try:
        if fh is not None:
            _HELD_TRAINING_LOCKS.append(fh)
        remove_stale_temporaries(out_dir)  # none is live: this run holds the folder
        yield
    finally:
        if fh is not None:
            if fh in _HELD_TRAINING_LOCKS:
                _HELD_TRAINING_LOCKS.remove(fh)
            try:  # removed while still held, so that no other run can lock this file
                os.remove(path)
            except FileNotFoundError:
                pass
            fh.close()  # releases the lock
