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


def test_worker_preload_needs_neither_pybids_nor_a_dataset():
    """The forkserver imports torch, Nipype, matplotlib and the interfaces; pybids stays in
    the main process (the sinks run there and the workflow names the mosaics), which keeps
    the forkserver's imports, and so the start of the first node, short."""
    code = ("import sys\nfrom bids_qsmnet.cli.execution import WORKER_PRELOAD\n"
            "for m in WORKER_PRELOAD: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m == 'bids' or m.startswith('bids.')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_report_node_writes_the_mosaics_the_workflow_named(tmp_path):
    import numpy as np
    from _bidsapp_fixtures import write_nifti
    from _report_fixtures import VOXEL, head

    from bids_qsmnet.interfaces.derivatives import ReportMosaics

    chi, mask = head()
    affine = np.diag([*VOXEL, 1.0])
    files = [write_nifti(tmp_path / f"{name}.nii.gz", vol, affine)
             for name, vol in (("field", 0.5 * chi), ("chi", chi))]
    mask_file = write_nifti(tmp_path / "mask.nii.gz", mask.astype(np.uint8), affine,
                            dtype=np.uint8)
    pngs = [str(tmp_path / "a" / "field.png"), str(tmp_path / "b" / "chi.png")]
    node = ReportMosaics(field_file=str(files[0]), chi_file=str(files[1]),
                         mask_file=str(mask_file), out_dir=str(tmp_path / "out"),
                         entities={"subject": "01", "suffix": "localfield"}, out_pngs=pngs)
    res = node.run(cwd=str(tmp_path))
    assert res.outputs.out_files == pngs
    assert all(os.path.getsize(p) > 1000 for p in pngs)
    assert not (tmp_path / "out").exists()  # nothing under the names it would have made
