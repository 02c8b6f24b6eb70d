"""The base class of the errors whose message is meant for the user as it is.

Each layer defines its own user errors (:class:`~bids_qsmnet.io.nifti.InputError`,
:class:`~bids_qsmnet.bids.settings.SettingsError`, :class:`~bids_qsmnet.io.locks.FolderLockedError`,
…) as subclasses of :class:`UserError`: their message names the file or option and the
problem, so the command line prints it as one line, without a traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "CLIError", "user_error_names"]


class UserError(Exception):
    """A failure the user can fix: the message names the file or option and the problem."""


def user_error_names() -> set[str]:
    """Class names of every user error defined so far, and ``MemoryError``.

    Nipype's crash files hold tracebacks as text: their exception lines are matched against
    these names.  A subclass counts once its module is imported (the command line imports
    them all while it builds the workflow).  ``MemoryError`` is included because the
    inference raises it with advice for the user (``--tile``).
    """
    names, todo = {"MemoryError"}, [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class CLIError(UserError, RuntimeError):
    """A command-line run that cannot go on (no dataset, nothing to process, a failed
    training): reported as one line, exit code 1."""
