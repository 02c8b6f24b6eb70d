"""R2*/T2* maps of multi-echo magnitude (:mod:`bids_qsmnet.phase.relaxometry`): analytic decay,
a raw dataset simulated by qsm-forward, the Nipype node and the files it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_qsmnet.phase.files import fit_relaxation
from bids_qsmnet.phase.relaxometry import R2STAR_MAX, fit_r2star

TES = np.array([0.004, 0.012, 0.020, 0.028])  # seconds
#: R2* (1/s) of each compartment of the analytic phantom, from CSF to iron-rich nuclei and
#: blood; faster decay leaves the last echo (28 ms) in the Rician noise floor at SNR 200
#: (200 1/s: median −1.3 %)
COMPARTMENT_R2S = (5.0, 10.0, 15.0, 25.0, 50.0, 100.0, 150.0)


def _decay(s0, r2s, tes=TES):
    """Noise-free magnitudes S0 exp(−R2* TE), echoes first."""
    return s0 * np.exp(-np.asarray(tes)[:, None, None, None] * r2s[None])


def _rician(signal, sigma, rng):
    """Magnitude of the signal with complex Gaussian noise of standard deviation ``sigma``."""
    noise = rng.normal(0, sigma, signal.shape) + 1j * rng.normal(0, sigma, signal.shape)
    return np.abs(signal + noise).astype(np.float32)


def test_noise_free_decay_is_exact():
    """Exact up to float32 arithmetic, up to R2* = 400 1/s (where the last echo holds 1e-8
    of the first one's weight)."""
    rng = np.random.default_rng(0)
    r2s = rng.uniform(1.0, 400.0, (12, 10, 8)).astype(np.float32)
    s0 = rng.uniform(50.0, 4000.0, r2s.shape)
    r2, t2 = fit_r2star(_decay(s0, r2s), TES, np.ones(r2s.shape, bool))
    np.testing.assert_allclose(r2, r2s, rtol=1e-4)
    np.testing.assert_allclose(t2, 1.0 / r2s, rtol=1e-4)
    assert r2.dtype == np.float32 and t2.dtype == np.float32


def test_analytic_decay_with_noise_within_one_percent():
    """Seven compartments, first-echo SNR 200 (complex Gaussian noise): the median R2* of
    each within 1 % of the truth, and the weighted fit beats the unweighted one where the
    signal decays fast."""
    rng = np.random.default_rng(1)
    shape = (len(COMPARTMENT_R2S), 30, 30)
    truth = np.broadcast_to(np.asarray(COMPARTMENT_R2S)[:, None, None], shape)
    s0 = 1000.0
    mags = _rician(_decay(s0, truth), s0 / 200, rng)
    r2, _ = fit_r2star(mags, TES, np.ones(shape, bool))
    for k, want in enumerate(COMPARTMENT_R2S):
        err = abs(np.median(r2[k]) - want) / want
        assert err < 0.01, (want, np.median(r2[k]))
    # unweighted least squares on ln S, for comparison: noisier at 150 1/s
    slope = np.polyfit(TES, np.log(mags[:, -1].reshape(len(TES), -1)), 1)[0]
    assert np.std(r2[-1]) < np.std(-slope)


def test_mask_clipping_and_no_nan():
    shape = (4, 4, 4)
    mask = np.zeros(shape, bool)
    mask[1:3, 1:3, 1:3] = True
    r2s = np.full(shape, 30.0)
    mags = _decay(100.0, r2s)
    mags[:, 1, 1, 1] = 0.0  # no signal: no decay to measure
    mags[:, 1, 1, 2] = _decay(100.0, np.full((1, 1, 1), 2000.0))[:, 0, 0, 0]  # beyond the range
    mags[:, 1, 2, 1] = 100.0 * np.exp(5.0 * TES)  # rising signal
    mags[1:, 2, 2, 2] = 0.0  # one usable echo
    mags[:, 2, 1, 1] = np.nan  # damaged voxel
    r2, t2 = fit_r2star(mags, TES, mask)
    assert np.all(np.isfinite(r2)) and np.all(np.isfinite(t2))
    assert not r2[~mask].any() and not t2[~mask].any()
    assert r2[1, 1, 1] == 0 and t2[1, 1, 1] == 0
    assert r2[1, 1, 2] == R2STAR_MAX and t2[1, 1, 2] == pytest.approx(1 / R2STAR_MAX)
    assert r2[1, 2, 1] == 0 and r2[2, 2, 2] == 0 and r2[2, 1, 1] == 0
    assert r2[1, 2, 2] == pytest.approx(30.0, rel=1e-4)
    assert t2[1, 2, 2] == pytest.approx(1 / 30.0, rel=1e-4)


@pytest.mark.parametrize("bad, match", [
    ((np.ones((1, 2, 2, 2)), [0.01], np.ones((2, 2, 2), bool)), "two or more"),
    ((np.ones((2, 2, 2, 2)), [0.01], np.ones((2, 2, 2), bool)), "1 echo times given for 2"),
    ((np.ones((2, 2, 2, 2)), [0.01, 0.02], np.ones((2, 2, 3), bool)), "mask shape"),
    ((np.ones((2, 2, 2, 2)), [10.0, 20.0], np.ones((2, 2, 2), bool)), "not in seconds"),
])
def test_refuses_impossible_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_r2star(*bad)


def test_fit_time_at_160_cubed():
    """160³ voxels × 4 echoes, brain-sized mask: well under 2 s."""
    shape = (160, 160, 160)
    grid = np.indices(shape, sparse=True)
    mask = sum(((g - 80) / 70.0) ** 2 for g in grid) < 1.0
    r2s = np.where(mask, 30.0, 0.0).astype(np.float32)
    mags = _decay(np.float32(800.0), r2s).astype(np.float32)
    fit_r2star(mags[:, :8], TES, mask[:8])  # warm-up
    t0 = time.perf_counter()
    r2, _ = fit_r2star(mags, TES, mask)
    elapsed = time.perf_counter() - t0
    assert np.allclose(r2[mask], 30.0, rtol=1e-3)
    assert elapsed < 2.0, f"{elapsed:.2f} s"


# --------------------------------------------------------------------------- qsm-forward

#: R2* (1/s) and relative proton density of each phantom label at 3 T
_LABEL_R2S = {1: 5.0, 2: 18.0, 3: 22.0, 4: 28.0, 5: 32.0, 6: 45.0, 7: 24.0, 8: 40.0, 9: 45.0,
              10: 40.0, 11: 60.0, 12: 120.0, 13: 90.0, 14: 15.0}
_LABEL_PD = {1: 1.0, 2: 0.85, 3: 0.7, 11: 0.9, 12: 0.3, 13: 0.8}


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    """A raw 4-echo GRE dataset simulated by qsm-forward (peak SNR 100, 3 T) from a
    bids_qsmnet phantom, with the R2*, M0 and label maps it was simulated from."""
    qsm_forward = pytest.importorskip("qsm_forward")
    from bids_qsmnet.data.synthetic import make_brain_phantom

    root = tmp_path_factory.mktemp("qsmforward")
    ph = make_brain_phantom((64, 64, 64), (3.0, 3.0, 3.0), rng=1)
    labels = np.where(ph.mask, ph.labels, 0).astype(np.int16)
    r2s = np.zeros(labels.shape, np.float32)
    m0 = np.zeros(labels.shape, np.float32)
    for lab in np.unique(labels[labels > 0]):
        r2s[labels == lab] = _LABEL_R2S.get(int(lab), 25.0)
        m0[labels == lab] = _LABEL_PD.get(int(lab), 0.75)
    maps = {"chi.nii": ph.chi, "M0.nii": m0, "R1.nii": np.where(ph.mask, 1.0, 0.0),
            "R2star.nii": r2s, "mask.nii": ph.mask.astype(np.uint8), "seg.nii": labels}
    for name, data in maps.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), root / name)
    tissue = qsm_forward.TissueParams(root_dir=str(root), chi="chi.nii", M0="M0.nii",
                                      R1="R1.nii", R2star="R2star.nii", mask="mask.nii",
                                      seg="seg.nii")
    recon = qsm_forward.ReconParams(subject="1", TEs=TES, TR=0.05, flip_angle=15, B0=3,
                                    peak_snr=100, random_seed=7, generate_phase_offset=False,
                                    generate_shim_field=False, voxel_size=np.ones(3))
    bids = root / "bids"
    qsm_forward.generate_bids(tissue, recon, str(bids), save_chi=False, save_mask=False,
                              save_segmentation=False)
    anat = bids / "sub-1" / "anat"
    mags = np.stack([nib.load(anat / f"sub-1_echo-{n}_part-mag_MEGRE.nii").get_fdata()
                     for n in range(1, len(TES) + 1)]).astype(np.float32)
    tes = [json.loads((anat / f"sub-1_echo-{n}_part-mag_MEGRE.json").read_text())["EchoTime"]
           for n in range(1, len(TES) + 1)]
    return {"mags": mags, "tes": tes, "r2s": r2s, "labels": labels, "mask": ph.mask,
            "names": ph.label_names}


def test_qsm_forward_compartments_within_ten_percent(forward_run):
    """In every tissue label the compartment's median R2* is within 10 % of the truth; in
    every label of 20 voxels or more, also the median of the voxels' relative errors (in the
    4-voxel calcification, R2* 120 1/s at proton density 0.3, single voxels are too noisy for
    that: 12 %, against 6 % for its median R2*)."""
    r2, t2 = fit_r2star(forward_run["mags"], forward_run["tes"], forward_run["mask"])
    truth = forward_run["r2s"]
    rel = np.abs(r2 - truth) / np.maximum(truth, 1e-6)
    labels = forward_run["labels"]
    checked, of_median = {}, {}
    for lab in np.unique(labels[labels > 0]):
        inside = labels == lab
        name = forward_run["names"][int(lab)]
        true = float(np.median(truth[inside]))
        of_median[name] = abs(float(np.median(r2[inside])) - true) / true
        if inside.sum() >= 20:
            checked[name] = float(np.median(rel[inside]))
    assert {"csf", "cortical_gm", "white_matter"} <= set(checked)
    assert all(err <= 0.10 for err in checked.values()), checked
    assert {"calcification", "hemorrhage", "red_nucleus", "substantia_nigra"} <= set(of_median)
    assert all(err <= 0.10 for err in of_median.values()), of_median
    assert np.all(np.isfinite(t2)) and not t2[~forward_run["mask"]].any()


# --------------------------------------------------------------------------- files and node


def _write_echoes(tmp_path, shape=(10, 10, 10)):
    rng = np.random.default_rng(3)
    r2s = rng.uniform(10.0, 80.0, shape).astype(np.float32)
    mags = _decay(500.0, r2s).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    mag = tmp_path / "sub-01_part-mag_MEGRE_echoes.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(mags, 0, -1), affine), mag)
    mask = np.zeros(shape, np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    mfile = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), mfile)
    return str(mag), str(mfile), r2s, mask > 0, affine


def test_fit_relaxation_files(tmp_path):
    mag, mfile, r2s, mask, affine = _write_echoes(tmp_path)
    r2_file, t2_file = fit_relaxation(mag, mfile, TES.tolist(), newpath=str(tmp_path / "o"))
    r2, t2 = nib.load(r2_file), nib.load(t2_file)
    assert r2.shape == (10, 10, 10) and np.allclose(r2.affine, affine)
    np.testing.assert_allclose(r2.get_fdata()[mask], r2s[mask], rtol=1e-4)
    assert not r2.get_fdata()[~mask].any()
    np.testing.assert_allclose(t2.get_fdata()[mask], 1 / r2s[mask], rtol=1e-4)


def test_fit_r2star_node(tmp_path):
    from bids_qsmnet.interfaces.phase import FitR2Star

    mag, mfile, r2s, mask, _ = _write_echoes(tmp_path)
    res = FitR2Star(magnitude_file=mag, mask_file=mfile, echo_times=TES.tolist()).run(
        cwd=str(tmp_path))
    out = nib.load(res.outputs.r2star_file).get_fdata()
    np.testing.assert_allclose(out[mask], r2s[mask], rtol=1e-4)
    assert res.outputs.t2star_file.startswith(str(tmp_path))


# --------------------------------------------------------------------------- graph and run


@pytest.mark.parametrize("variant", ["three echoes", "no magnitude", "one echo"])
def test_graph_has_the_fit_only_with_two_magnitude_echoes(variant, tmp_path):
    """The R2* node and its sinks exist for sub-03 (3 echoes with magnitudes) only; without
    magnitudes, or with one echo, the run and its listed outputs are those of the phase chain."""
    import dataclasses

    from bids_qsmnet.bids.discovery import build_layout, collect_runs
    from bids_qsmnet.workflows.base import init_single_run_wf, run_outputs

    (run,) = collect_runs(build_layout(EXAMPLE), "03")
    if variant == "no magnitude":
        run = dataclasses.replace(run, mask=str(tmp_path / "mask.nii.gz"), echoes=[
            dataclasses.replace(e, magnitude=None) for e in run.echoes])
    elif variant == "one echo":
        run = dataclasses.replace(run, echoes=run.echoes[:1])
    wf = init_single_run_wf(run, bids_root=str(EXAMPLE), out_dir=str(tmp_path / "out"),
                            model=None, device="cpu", tile=None, dc_lambda=None,
                            omp_nthreads=1, overwrite=False, b0_strength=None, name="run_wf")
    names = set(wf.list_node_names())
    fitted = {"phase_wf.r2star", "ds_r2starmap", "ds_t2starmap"}
    names_out = {Path(p).name for p in run_outputs(run, str(tmp_path / "out"))}
    maps = {"sub-03_R2starmap.nii.gz", "sub-03_T2starmap.json", "sub-03_desc-r2star_mosaic.png"}
    if variant == "three echoes":
        assert fitted <= names and maps <= names_out
    else:
        assert not fitted & names and not maps & names_out
        assert "phase_wf.total_field" in names


# --------------------------------------------------------------------------- whole run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ds-synthetic"


@pytest.fixture(scope="module")
def sub03_run(tmp_path_factory):
    """The BIDS-App on the example dataset's raw GRE subject (sub-03, 3 echoes), about 20 s."""
    from _bidsapp_fixtures import make_model_file

    base = tmp_path_factory.mktemp("sub03")
    model = make_model_file(base / "lite.safetensors", seed=2)
    out = base / "out"
    cmd = [str(Path(sys.executable).with_name("bids_qsmnet")), str(EXAMPLE), str(out),
           "participant", "--participant-label", "03", "--model", str(model),
           "-w", str(base / "work"), "--plugin", "Linear", "--nprocs", "1",
           "--omp-nthreads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_participant_run_writes_r2star_and_t2star(sub03_run):
    from bids_qsmnet.bids.discovery import build_layout, collect_runs
    from bids_qsmnet.workflows.base import run_outputs

    out, anat = sub03_run, sub03_run / "sub-03" / "anat"
    tes = [json.loads((EXAMPLE / f"sub-03/anat/sub-03_echo-{n}_part-mag_MEGRE.json")
                      .read_text())["EchoTime"] for n in (1, 2, 3)]
    r2_meta = json.loads((anat / "sub-03_R2starmap.json").read_text())
    t2_meta = json.loads((anat / "sub-03_T2starmap.json").read_text())
    assert (r2_meta["Units"], t2_meta["Units"]) == ("1/s", "s")
    for meta in (r2_meta, t2_meta):
        assert meta["EchoTime"] == tes and meta["SkullStripped"] is True
        assert "log-linear" in meta["EstimationAlgorithm"]
        assert meta["MagneticFieldStrength"] == 3.0
        assert "bids:raw:sub-03/anat/sub-03_echo-1_part-mag_MEGRE.nii.gz" in meta["Sources"]
    r2 = nib.load(anat / "sub-03_R2starmap.nii.gz").get_fdata()
    t2 = nib.load(anat / "sub-03_T2starmap.nii.gz").get_fdata()
    brain = np.asarray(nib.load(anat / "sub-03_desc-brain_mask.nii.gz").dataobj) > 0
    assert r2.shape == brain.shape and not r2[~brain].any() and not t2[~brain].any()
    # the example's brain decays at 20 1/s plus 120 1/s per ppm of |χ| (data/megre.py)
    assert 19.0 < np.median(r2[brain]) < 26.0
    assert np.all((r2 >= 0) & (r2 <= R2STAR_MAX))
    np.testing.assert_allclose(t2[r2 > 0], 1 / r2[r2 > 0], rtol=1e-5)
    assert "R2* (1/s) was fitted to the magnitude echoes" in (
        out / "logs" / "CITATION.md").read_text()
    png = out / "sub-03" / "figures" / "sub-03_desc-r2star_mosaic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # run_outputs lists exactly what the run wrote (reruns skip only complete runs)
    (run,) = collect_runs(build_layout(EXAMPLE), "03")
    listed = {Path(p).relative_to(out) for p in run_outputs(run, str(out))}
    written = {p.relative_to(out) for p in (out / "sub-03").rglob("*") if p.is_file()}
    assert listed == written


def test_methods_text_names_the_fit_only_when_it_runs():
    from bids_qsmnet.reports.boilerplate import methods_steps

    def text(**kw):
        return " ".join(t for t, _ in methods_steps(local=False, **kw))

    assert "R2*" in text(raw=True, relaxometry=True)
    assert "R2*" not in text(raw=True, relaxometry=False)


def _validator_issues(dataset: Path) -> list[dict]:
    exe = shutil.which("bids-validator-deno") or str(
        Path(sys.executable).with_name("bids-validator-deno"))
    proc = subprocess.run([exe, str(dataset), "--format", "json"], capture_output=True,
                          text=True, timeout=300)
    return json.loads(proc.stdout)["issues"]["issues"]


def test_relaxation_maps_pass_bids_validator_deno(sub03_run, tmp_path):
    """bids-validator-deno finds nothing to say about the R2starmap/T2starmap files and their
    sidecars; a copy whose R2* sidecar lacks SkullStripped (required for derivative images)
    is flagged, so the validator does look at them."""
    if not (shutil.which("bids-validator-deno")
            or Path(sys.executable).with_name("bids-validator-deno").exists()):
        pytest.skip("bids-validator-deno is not installed")

    def about_maps(issues):
        return [i for i in issues if "starmap" in (i.get("location") or "")]

    assert about_maps(_validator_issues(sub03_run)) == []
    broken = tmp_path / "broken"
    shutil.copytree(sub03_run, broken)
    sidecar = broken / "sub-03/anat/sub-03_R2starmap.json"
    meta = json.loads(sidecar.read_text())
    del meta["SkullStripped"]
    sidecar.write_text(json.dumps(meta))
    flagged = about_maps(_validator_issues(broken))
    assert any(i["code"] == "SIDECAR_KEY_REQUIRED" and "R2starmap" in i["location"]
               for i in flagged), flagged
