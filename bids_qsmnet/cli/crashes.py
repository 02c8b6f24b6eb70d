"""What failed in a run: the causes in Nipype's text crash files, matched to the runs that
have no χ map.

A user error (:class:`~bids_qsmnet.errors.UserError` and its subclasses, raised in a worker)
reaches this process only as a traceback in a crash file; its message is reported as it is,
any other exception with its class name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import user_error_names

LOGGER = logging.getLogger("bids_qsmnet")

__all__ = ["crash_causes", "run_cause", "failed_runs"]

_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*(\w+(?:Error|Exception|Exit)): (.+)$")


def _crash_file_cause(text: str, user_errors: set[str]) -> tuple[str | None, str | None]:
    """``(node, message)`` of one crash file: its node and innermost exception (Nipype wraps
    it in a ``NodeExecutionError``), without the class for a user error."""
    node, cause = None, None
    for line in text.splitlines():
        if line.startswith("Node: ") and node is None:
            node = line[6:].strip()
        m = _EXCEPTION_LINE.match(line)
        if m and m.group(1) != "NodeExecutionError":
            cls, msg = m.groups()
            cause = msg.strip() if cls in user_errors else f"{cls}: {msg.strip()}"
    return node, cause


def crash_causes(crash_dir: Path, *, since: float) -> list[tuple[str, str, str]]:
    """``(node, message, crash file)`` of each text crash file written since ``since``
    (seconds since the epoch; crash files of earlier runs stay in the work folder)."""
    user_errors = user_error_names()
    out = []
    for path in sorted(crash_dir.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        if path.stat().st_mtime < since - 1:
            continue
        node, cause = _crash_file_cause(path.read_text(errors="replace"), user_errors)
        if node and cause:
            out.append((node, cause, str(path)))
    return out


def run_cause(causes, key: str) -> tuple[str, str, str] | None:
    """``(message, node name, crash file)`` of the first crash of the run ``key`` (its nodes
    live in ``run_<key>_wf``), or None."""
    from ..workflows.base import run_workflow_name

    tag = f".{run_workflow_name(key)}."
    for node, cause, path in causes:
        if tag in f".{node}.":
            return cause, node.rsplit(".", 1)[-1], path
    return None


def failed_runs(runs: Sequence, out_dir: str, work_dir: Path, *,
                since: float) -> list[tuple[object, str]]:
    """``(run, message)`` of each run without a χ map in ``out_dir``, with the cause found in
    the crash files written since ``since`` (each is logged)."""
    from ..bids.derivatives import derivative_path

    causes = crash_causes(work_dir / "crashes", since=since)
    failed = []
    for run in runs:
        if os.path.exists(derivative_path(out_dir, run.entities, suffix="Chimap")):
            continue
        cause = run_cause(causes, run.key)
        if cause:
            LOGGER.error("%s failed in node %s (crash file %s)", run.key, cause[1], cause[2])
        failed.append((run, f"{run.key}: {cause[0]}" if cause else
                       f"{run.key}: processing failed; see the crash files in "
                       f"{work_dir}/crashes"))
    return failed
