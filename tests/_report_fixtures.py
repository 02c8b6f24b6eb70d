"""A subject's derivatives and report at an anisotropic 0.86 × 0.86 × 2 mm acquisition, for
the report tests (tests/test_reports.py, tests/test_report_browser.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _bidsapp_fixtures import write_json, write_nifti

from bids_qsmnet.physics.dipole import forward_field
from bids_qsmnet.reports.figures import make_mosaics, plot_mosaic
from bids_qsmnet.reports.html import write_subject_report

VOXEL = (0.86, 0.86, 2.0)
SHAPE = (128, 128, 48)


def head(shape=SHAPE, voxel=VOXEL):
    """χ (ppm) and mask of an ellipsoidal brain in physical space (radii 45, 50, 38 mm): a
    diamagnetic white-matter core (−0.03), a grey ribbon (+0.015) and two paramagnetic
    nuclei (+0.12)."""
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel)],
                       indexing="ij")
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, (45.0, 50.0, 38.0))))
    mask = r <= 1.0
    chi = np.where(r < 0.8, -0.03, 0.015) * mask
    for cx in (-14.0, 14.0):
        nucleus = (grid[0] - cx) ** 2 + grid[1] ** 2 + grid[2] ** 2 <= 6.0 ** 2
        chi = np.where(nucleus, 0.12, chi)
    return chi.astype(np.float32), mask


def make_subject_report(out: Path, *, warnings=(), extra_kinds=("r2star",)) -> Path:
    """Derivatives of sub-01 (χ map and sidecar, field and χ mosaics, one more mosaic per
    ``extra_kinds``) and its report; returns the HTML page."""
    chi, mask = head()
    field = forward_field(chi, voxel_size=VOXEL)
    affine = np.diag([*VOXEL, 1.0])
    anat = out / "sub-01" / "anat"
    chi_file = write_nifti(anat / "sub-01_Chimap.nii.gz", chi, affine)
    mask_file = write_nifti(anat / "sub-01_desc-brain_mask.nii.gz", mask.astype(np.uint8),
                            affine, dtype=np.uint8)
    field_file = write_nifti(out / "in" / "sub-01_localfield.nii.gz", field, affine)
    write_json(anat / "sub-01_Chimap.json", {
        "Units": "ppm", "Sources": ["bids:raw:sub-01/anat/sub-01_localfield.nii.gz"],
        "InputUnits": "ppm", "B0DirectionSource": "affine",
        "SoftwareName": "bids_qsmnet", "SoftwareVersion": "test",
        "Model": {"Name": "qsmnet-test", "SHA256": "ab" * 32, "FormatVersion": 1},
        "B0Direction": [0.0, 0.0, 1.0], "ObliquityDeg": 0.0,
        "DataConsistency": {"lambda": 0.0123, "lambda_rule": "auto", "rho0": 0.2468,
                            "iterations": 30, "edge_mm": 0.0, "highpass_mm": 0.0},
        "ResampledToNetworkFrame": "yes: 1.0 mm isotropic grid [110, 110, 96]",
        "Device": "cpu"})
    make_mosaics(field_file, chi_file, mask_file, str(out), {"subject": "01",
                                                             "suffix": "Chimap"})
    figures = out / "sub-01" / "figures"
    for kind in extra_kinds:
        r2 = np.where(mask, 20.0 + 30.0 * (chi > 0.1), 0.0)
        plot_mosaic(r2, figures / f"sub-01_desc-{kind}_mosaic.png", mask=mask,
                    voxel_size=VOXEL, symmetric=False, label="R2*", unit="1/s", title=kind)
    return Path(write_subject_report(str(out), "01", warnings=list(warnings),
                                     provenance={"plugin": "Linear"}))
