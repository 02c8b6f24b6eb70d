"""Slice mosaics (physical aspect, panel sizes, windows symmetric about 0) and the subject's
HTML report (every mosaic found, the settings and warnings tables)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _report_fixtures import VOXEL, make_subject_report
from PIL import Image
from scipy import ndimage

from bids_qsmnet.reports.figures import mosaic_layout, panel_aspect, plot_mosaic, symmetric_window
from bids_qsmnet.reports.html import dc_summary, run_mosaics


def test_panel_aspect_is_the_ratio_of_the_displayed_voxel_sizes():
    vs = (0.86, 0.86, 2.0)
    assert panel_aspect(vs, 2) == pytest.approx(1.0)          # axial: x across, y up
    assert panel_aspect(vs, 1) == pytest.approx(2.0 / 0.86)   # coronal: z up, x across
    assert panel_aspect(vs, 0) == pytest.approx(2.0 / 0.86)   # sagittal: z up, y across
    assert panel_aspect((1.0, 3.0, 2.0), 2) == pytest.approx(3.0)


def test_layout_keeps_every_panel_at_least_min_px_and_at_its_physical_aspect():
    extents = [(140.0, 180.0), (140.0, 96.0), (180.0, 96.0)]
    sizes = mosaic_layout(extents, 7, min_px=200)
    assert len({w for w, _ in sizes}) == 1                    # rows of equal width
    assert min(min(s) for s in sizes) >= 200
    assert min(min(s) for s in sizes) <= 201                  # no larger than needed
    for (w, h), (ew, eh) in zip(sizes, extents):
        assert h / w == pytest.approx(eh / ew, abs=2 / w)


def test_symmetric_window_is_the_percentile_of_the_magnitude_inside_the_mask():
    vol = np.zeros((10, 10, 10), np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[:, :, :5] = True
    vol[:, :, :5] = np.linspace(-0.1, 0.2, 500).reshape(10, 10, 5)   # |χ| up to 0.2
    vol[:, :, 5:] = 50.0                                             # outside: ignored
    assert symmetric_window(vol, mask, percentile=100) == pytest.approx(0.2)
    # 1 % of the 500 values lie above 0.197 (0.2 − 0.3 · 5 / 499)
    assert symmetric_window(vol, mask, percentile=99) == pytest.approx(0.197, abs=1e-3)
    assert symmetric_window(np.zeros((3, 3, 3))) == 1.0


def _ball_mosaic(tmp_path, vs, n_slices=1):
    """A physical ball (χ 0.2 ppm inside 20 mm, −0.1 ppm from 20 to 30 mm) at voxel size ``vs``,
    ``n_slices`` per view; returns the PNG as an RGB array and its Description."""
    shape = [int(round(80 / v)) for v in vs]
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, vs)],
                       indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))
    chi = np.where(r <= 20, 0.2, np.where(r <= 30, -0.1, 0.0)).astype(np.float32)
    png = plot_mosaic(chi, tmp_path / "ball.png", mask=r <= 30, voxel_size=vs, n_slices=n_slices,
                      label="χ")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")), im.text["Description"]


def test_mosaic_draws_a_physical_ball_round_in_every_view_and_zero_mid_grey(tmp_path):
    rgb, description = _ball_mosaic(tmp_path, VOXEL)
    # the window is ±p99 of |χ| = ±0.2 ppm, so 0.2 is white, −0.1 a quarter up, 0 mid-grey
    assert "±0.2 ppm = ±p99 of |χ|" in description
    white = np.all(rgb >= 250, axis=2)
    labels, n = ndimage.label(white)
    boxes = ndimage.find_objects(labels)
    discs = sorted(boxes, key=lambda b: -(b[0].stop - b[0].start) * (b[1].stop - b[1].start))[:3]
    assert len(discs) == 3
    for rows, cols in discs:
        h, w = rows.stop - rows.start, cols.stop - cols.start
        assert w / h == pytest.approx(1.0, abs=0.06), (w, h)  # squashed would be 0.43 or 2.3
        assert min(w, h) >= 0.5 * 200                         # 40 mm of a ≥ 68 mm panel
        ring = rgb[rows.start - 3, (cols.start + cols.stop) // 2]  # just outside the core
        assert np.all(np.abs(ring.astype(int) - 255 * 0.1 / 0.4) <= 3), ring
        px_mm = h / 40.0                                      # the core is 40 mm across
        cy, cx = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
        corner = rgb[cy + int(31 * px_mm), cx + int(31 * px_mm)]  # 44 mm out: χ = 0
        assert np.all(np.abs(corner.astype(int) - 127.5) <= 2), corner


def test_mosaic_panels_are_at_least_200_px_with_little_empty_canvas(tmp_path):
    rgb, _ = _ball_mosaic(tmp_path, VOXEL, n_slices=7)
    labels, _ = ndimage.label(np.any(rgb > 20, axis=2))
    panels = [b for b in ndimage.find_objects(labels)
              if b[0].stop - b[0].start >= 100 and b[1].stop - b[1].start >= 100]
    assert len(panels) == 3 * 7
    area = sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in panels)
    for rows, cols in panels:
        assert min(rows.stop - rows.start, cols.stop - cols.start) >= 200
    assert area / (rgb.shape[0] * rgb.shape[1]) > 0.6            # tight: mostly slices


def test_dc_summary_states_the_lambda_and_how_it_was_chosen():
    auto = dc_summary({"lambda": 0.0123, "lambda_rule": "auto", "rho0": 0.2468,
                       "iterations": 30})
    assert auto == ("λ = 0.0123, chosen per input (the network left 24.7 % of the field "
                    "unexplained); 30 CG iterations")
    noisy = dc_summary({"lambda": 0.0123, "lambda_rule": "auto", "rho0": 0.2468,
                        "noise_ppb": 1.034, "iterations": 30})
    assert "(the network left 24.7 % of the field unexplained; field noise 1.03 ppb)" in noisy
    assert dc_summary({"lambda": 0.0, "lambda_rule": "auto", "rho0": 0.01,
                       "iterations": 30}).startswith("none, chosen per input")
    assert dc_summary({"lambda": 0.0, "iterations": 0}) == "off (the network’s χ)"
    tv = {"lambda": 1e-4, "lambda_rule": "auto", "iterations": 20, "solver": "tv-admm",
          "tv": 1e-4}
    assert dc_summary(tv).endswith("; TV weight 0.0001 ppm·mm, 20 ADMM iterations from the "
                                   "network’s map")
    assert dc_summary({**tv, "penalty_scale": 3.0}).endswith(
        "20 ADMM iterations (penalty scale 3) from the network’s map")


def test_report_shows_every_mosaic_found_with_captions_settings_and_warnings(tmp_path):
    page = make_subject_report(tmp_path, extra_kinds=("r2star", "t2starw"),
                               warnings=["3 NaN voxels left out of the mask",
                                         "sub-01_Chimap: obliquity above 25 degrees",
                                         "low memory <budget>"])
    text = page.read_text()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert srcs == [f"sub-01/figures/sub-01_desc-{k}_mosaic.png"
                    for k in ("field", "chimap", "r2star", "t2starw")]
    assert all((tmp_path / s).is_file() for s in srcs)
    assert "R2* (1/s) on axial" in text                         # the known kind's caption
    assert "t2starw on axial, coronal and sagittal slices." in text  # the default caption
    assert re.search(r"χ \(ppm\), window ±[0-9.]+ ppm = ±p99 of \|χ\|", text)
    assert "±p99 of |local field|" in text
    settings = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>",
                               text.split("<table class='settings'>")[1].split("</table>")[0]))
    assert settings["Model"].startswith("qsmnet-test (sha256 abababab")
    assert settings["Data consistency λ"].startswith("λ = 0.0123, chosen per input")
    assert settings["B0 direction (voxel space)"] == "[0.0, 0.0, 1.0]"
    assert settings["Resampled to network frame"].startswith("yes: 1.0 mm")
    assert settings["Device"] == "cpu"
    # the warning naming the run sits with it, the others in the subject's table, escaped
    run_part, rest = text.split("<h2>Warnings</h2>")
    assert "obliquity above 25 degrees" in run_part.split("<table class='warnings'>")[1]
    assert "3 NaN voxels" in rest and "low memory &lt;budget&gt;" in rest


def test_run_mosaics_orders_known_kinds_first_and_ignores_other_runs(tmp_path):
    for name in ("sub-01_desc-zeta_mosaic.png", "sub-01_desc-chimap_mosaic.png",
                 "sub-01_run-2_desc-field_mosaic.png", "sub-01_desc-field_mosaic.png",
                 "sub-01_desc-field_mosaic.svg"):
        (tmp_path / name).write_bytes(b"")
    assert [k for k, _ in run_mosaics(str(tmp_path), "sub-01")] == ["field", "chimap", "zeta"]
    assert [k for k, _ in run_mosaics(str(tmp_path), "sub-01_run-2")] == ["field"]
    assert run_mosaics(str(tmp_path / "none"), "sub-01") == []
