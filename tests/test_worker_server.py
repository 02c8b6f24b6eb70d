"""The MultiProc workers' forkserver: its environment (glibc's malloc settings for large
arrays) reaches the workers, and a value the user set wins."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

SCRIPT = """
import multiprocessing, os, sys
from bids_qsmnet.cli.execution import WORKER_MALLOC, start_worker_server


def report(q):
    q.put({k: os.environ.get(k) for k in WORKER_MALLOC})


if __name__ == "__main__":
    start_worker_server()
    ctx = multiprocessing.get_context("forkserver")
    q = ctx.Queue()
    p = ctx.Process(target=report, args=(q,))
    p.start()
    print(q.get(timeout=120))
    p.join()
"""


@pytest.mark.parametrize("user_value", [None, "65536"])
def test_workers_get_the_malloc_settings_unless_the_user_set_them(user_value, tmp_path):
    from bids_qsmnet.cli.execution import WORKER_MALLOC

    script = tmp_path / "server.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if user_value:
        env["MALLOC_MMAP_THRESHOLD_"] = user_value
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    seen = ast.literal_eval(res.stdout.strip().splitlines()[-1])  # the dict the script printed
    assert seen["MALLOC_TRIM_THRESHOLD_"] == WORKER_MALLOC["MALLOC_TRIM_THRESHOLD_"]
    assert seen["MALLOC_MMAP_THRESHOLD_"] == (user_value or WORKER_MALLOC["MALLOC_MMAP_THRESHOLD_"])
    assert int(WORKER_MALLOC["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 30
