"""Preloaded by the forkserver that starts Nipype's MultiProc workers: the forkserver and
every worker it forks end when the bids_qsmnet process that started them ends.

Without it, a run killed with SIGKILL (``kill -9``, the OOM killer) leaves its forkserver and
its workers waiting on their task queues for ever, each worker holding torch and its memory.
Linux only (``PR_SET_PDEATHSIG``); elsewhere importing this module does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["die_with_parent", "apply_log_level", "NIPYPE_LEVEL_ENV"]

#: Nipype's log level for the workers (``WARNING``, ``INFO`` with ``-v``), set by the main
#: process before the forkserver starts: a worker's Nipype otherwise logs every node's
#: set-up and execution at its default INFO level onto the console
NIPYPE_LEVEL_ENV = "BIDS_QSMNET_NIPYPE_LEVEL"


def die_with_parent() -> None:
    """Have the kernel send SIGTERM to this process when its parent ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def apply_log_level() -> None:
    """Set Nipype's loggers in this worker to the level of :data:`NIPYPE_LEVEL_ENV`."""
    level = os.environ.get(NIPYPE_LEVEL_ENV)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return
    import logging

    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(level)


def _in_worker() -> None:
    die_with_parent()
    apply_log_level()  # after the forkserver's imports: importing Nipype resets its levels


# the forkserver imports this module: it ends with the main process, and each worker it forks
# ends with the forkserver and logs at the run's level
die_with_parent()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_worker)
