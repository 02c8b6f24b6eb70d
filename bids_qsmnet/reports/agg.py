"""matplotlib's pyplot on the non-interactive Agg backend.

Importing this module selects Agg (BIDS-Apps never open a window) and loads pyplot; the
MultiProc workers' forkserver imports it once (:data:`bids_qsmnet.cli.execution.WORKER_PRELOAD`)
so that the report node does not pay the import in every worker.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
